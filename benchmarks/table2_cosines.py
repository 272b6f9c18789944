"""Where Table 2's per-image test finds its gap (docs/shapes_world_2.md, section 23): the CLIP's
cosines before CLIPScore's floor at 0, and how alike each image's decoded texts are.

    python benchmarks/table2_cosines.py projection.checkpoint=outputs/.../projection images.n=500

For the image prompts, random vectors of matched norm (as the recipe draws them) and Gaussian
vectors with the encoder features' mean and covariance sent through the same projection, it
decodes each vector to its 5 nearest tokens, encodes the images and texts with the configured
CLIP and prints per kind: the median number of different texts per image, the norm of the mean
of each image's text embeddings (1 when all its texts are one), the share of negative cosines
(which CLIPScore sets to 0), the spread of the per-image means, and KS tests against random
vectors on the per-image mean cosine and on the per-image mean CLIPScore (Table 2's test).
Overrides are those of experiments/prompt_decoding.py.
"""

import sys

import numpy as np
import torch
from scipy.stats import ks_2samp

import mmn  # noqa: F401
from mmn.analysis.clipscore import ClipScorer
from mmn.analysis.decoding import join_tokens
from mmn.analysis.prompts import decode_prompts, random_prompts
from mmn.config import compose
from mmn.recipes.run import Run


@torch.no_grad()
def embed_texts(clip: ClipScorer, texts: list[str], chunk: int = 256) -> torch.Tensor:
    """Each text's normalised CLIP embedding [n, embed], each distinct text encoded once."""
    distinct = sorted(set(texts))
    rows = {text: i for i, text in enumerate(distinct)}
    table = torch.cat([clip.model.encode_text(clip.tokenizer(distinct[s : s + chunk]).to(clip.device), normalize=True)
                       for s in range(0, len(distinct), chunk)]).float().cpu()
    return table[torch.tensor([rows[text] for text in texts])]


@torch.no_grad()
def main(overrides: list[str]) -> None:
    cfg = compose([*overrides, "logger=none", "paths.output_dir=outputs/table2_cosines"], config_name="prompt_decoding")
    run = Run(cfg)
    captioner, clip = run.captioner(), ClipScorer(cfg.clip.model, cfg.clip.pretrained)
    items, _ = run.read_images(list(range(run.n_images)))
    features = torch.cat([captioner.encoder(captioner.preprocess([item["image"] for item in items[s : s + 50]])).float()
                          for s in range(0, len(items), 50)])  # [n, positions, d_enc]
    n, positions, d_enc = features.shape
    flat = features.flatten(0, 1)
    generator = torch.Generator().manual_seed(cfg.seed)
    root = torch.linalg.cholesky(torch.cov(flat.T) + 1e-5 * torch.eye(d_enc))
    gaussian = flat.mean(0) + torch.randn(n * positions, d_enc, generator=generator) @ root.T  # [n * positions, d_enc]
    dtype = next(captioner.projection.parameters()).dtype
    prompts = captioner.projection(features.to(dtype)).float().flatten(0, 1)  # [n * positions, d_lm]
    vectors = {"prompt": prompts,
               "random": random_prompts(len(prompts), prompts.shape[1], generator, prompts.norm(dim=-1)),
               "gaussian": captioner.projection(gaussian.reshape(n, positions, d_enc).to(dtype)).float().flatten(0, 1)}
    images = torch.stack([clip.preprocess(item["image"]) for item in items]).to(clip.device)
    image_embeddings = clip.model.encode_image(images, normalize=True).float().cpu()  # [n, embed]
    means = {}
    print(f"{n} images; image embeddings: mean pairwise cosine {(image_embeddings @ image_embeddings.T).mean():.3f}")
    for kind, rows in vectors.items():
        texts = [join_tokens(tokens) for tokens in decode_prompts(captioner.lm, rows)]
        text_embeddings = embed_texts(clip, texts).reshape(n, positions, -1)
        cosine = (image_embeddings[:, None] * text_embeddings).sum(-1)  # [n, positions]
        means[kind] = {"cosine": cosine.mean(1).numpy(), "clipscore": (100 * cosine.clamp(min=0)).mean(1).numpy()}
        different = np.median([len(set(texts[i * positions : (i + 1) * positions])) for i in range(n)])
        print(f"{kind:9s} texts per image {different:4.0f}  |mean text embedding| {text_embeddings.mean(1).norm(dim=-1).mean():.3f}"
              f"  cosines < 0 {(cosine < 0).float().mean():.2f}  per-image mean (s.d.): cosine {means[kind]['cosine'].mean():.3f}"
              f" ({means[kind]['cosine'].std():.3f}), CLIPScore {means[kind]['clipscore'].mean():.2f} ({means[kind]['clipscore'].std():.2f})")
    for kind in ("prompt", "gaussian"):
        tests = {measure: ks_2samp(means[kind][measure], means["random"][measure]) for measure in ("cosine", "clipscore")}
        print(f"{kind} vs random, KS D (p): " + ", ".join(f"{measure} {test.statistic:.3f} ({test.pvalue:.2g})"
                                                         for measure, test in tests.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
