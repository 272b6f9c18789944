"""LLaVA as a captioner, on tiny random LlavaForConditionalGeneration models saved with their
processor (tests/conftest.py `save_tiny_llava`): the captioner's input is what LLaVA computes, one
copy of the weights, grad attribution against captum at the image positions inside the chat prompt,
a planted unit found, decoded and ablated, `analyze.py model=llava` end to end, and the receptive
fields on the tower's patch grid."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import pandas as pd
import pytest
import torch
from captum.attr import LayerGradientXActivation
from PIL import Image

from mmn.analysis.ablation import ablate, ablate_masks, ablation_settings, ablation_sweep
from mmn.analysis.attribution import grad_attribution, target_probabilities
from mmn.analysis.filter import InterpretableFilter
from mmn.analysis.neurons import UnitDecoder, caption_and_attribute, unit_ranking
from mmn.analysis.receptive_fields import unit_activation_maps
from mmn.config import compose
from mmn.models.encoders import load_encoder
from mmn.models.llava import load_llava
from mmn.models.targets import get_finder

PLANTED_LAYER, PLANTED_UNIT = 0, 7
PREFIX = 3  # "<s> USER :" before the image in LLaVA 1.5's chat prompt


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, save_tiny_llava):
    directory = tmp_path_factory.mktemp("llava")
    save_tiny_llava(directory)
    return directory


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, save_tiny_llava, tiny_llava_sizes):
    """A tiny LLaVA whose LM unit L0.u7 fires at the image prompts (its projector writes a direction
    r there that no text embedding has) and writes the unembedding direction of "circle"; layer 1
    attends uniformly, so the write reaches the position that predicts the caption. Dimension 0
    carries "circle", dimension 1 r; no other unit reads or writes either."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("planted")
    model = save_tiny_llava(directory)
    lm, projector = model.model.language_model, model.model.multi_modal_projector
    d_lm = tiny_llava_sizes.d_lm
    circle_direction, region = torch.eye(d_lm)[0], torch.eye(d_lm)[1]
    circle = AutoTokenizer.from_pretrained(directory).convert_tokens_to_ids("circle")
    with torch.no_grad():
        for name, parameter in lm.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.01)
        lm.embed_tokens.weight[:, :2] = 0
        for layer in lm.layers:
            layer.mlp.gate_proj.weight[:, :2] = layer.mlp.up_proj.weight[:, :2] = 0
            layer.mlp.down_proj.weight[:2] = 0
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                               layer.self_attn.o_proj):
                projection.weight.zero_()
        lm.layers[1].self_attn.v_proj.weight.copy_(torch.eye(d_lm))  # uniform attention, values copied
        lm.layers[1].self_attn.o_proj.weight.copy_(torch.eye(d_lm))
        mlp = lm.layers[PLANTED_LAYER].mlp
        mlp.gate_proj.weight[PLANTED_UNIT] = 2.0 * region  # A = silu(2 r.x) (r.x): large where r is
        mlp.up_proj.weight[PLANTED_UNIT] = region
        mlp.down_proj.weight[:, PLANTED_UNIT] = circle_direction
        projector.linear_2.weight[:2] = 0
        projector.linear_2.bias[:2] = torch.tensor([0.0, 4.0])  # every image prompt carries 4 r
        model.lm_head.weight[:, :2] = 0
        model.lm_head.weight[circle] = 40.0 * circle_direction
    model.save_pretrained(directory)
    return directory


def images(n: int) -> list[Image.Image]:
    """Non-square images, so that the processor's resize and centre crop both act."""
    return [Image.new("RGB", (60 + 7 * i, 45), (200 - 40 * i, 30 * i, 90)) for i in range(n)]


def test_the_captioners_input_is_what_llava_computes(llava_dir):
    from transformers import AutoProcessor, CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    captioner = load_llava(llava_dir, dtype="float32")
    reference = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    assert captioner.prompt == "USER: <image>\nDescribe the image in one sentence. ASSISTANT: A picture of"
    assert captioner.encoder.grid == (3, 3) and captioner.n_image_tokens == 9
    assert captioner.image_positions == slice(PREFIX, PREFIX + 9)
    assert isinstance(captioner.encoder.model, CLIPVisionModel) and isinstance(captioner.lm.model, LlamaForCausalLM)

    inputs = processor(images=images(2), text=[captioner.prompt] * 2, return_tensors="pt")
    ids = inputs["input_ids"]  # [2, n_prompt]: the image token repeated at the image positions
    assert ids.shape[1] == captioner.n_prompt
    assert (ids[:, captioner.image_positions] == reference.config.image_token_id).all()
    assert ids[0, :PREFIX].tolist() == captioner.prefix_ids.tolist()
    pixels = captioner.preprocess(images(2))  # our resize + crop of the same images
    torch.testing.assert_close(pixels, inputs["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        theirs = reference(**inputs).logits  # [2, n_prompt, vocab]
        ours = captioner.lm.model(inputs_embeds=captioner.input_embeddings(inputs["pixel_values"])).logits
        generated = reference.generate(**inputs, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    eos = processor.tokenizer.eos_token_id
    for row, caption in zip(generated.tolist(), captioner.generate(inputs["pixel_values"], max_new_tokens=6)):
        assert caption == (row[: row.index(eos)] if eos in row else row)


def test_one_copy_of_the_weights(llava_dir):
    """The captioner holds the checkpoint's parameters once: tower, LM and unembedding are the
    loaded modules themselves, the projector a copy; nothing is left on the meta device."""
    from transformers import LlavaForConditionalGeneration

    captioner = load_llava(llava_dir, dtype="bfloat16")
    checkpoint = sum(p.numel() for p in LlavaForConditionalGeneration.from_pretrained(llava_dir).parameters())
    held = {id(p): p for p in captioner.parameters()}  # nn.Module.parameters() lists a shared tensor once
    assert sum(p.numel() for p in held.values()) == checkpoint
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in held.values())
    assert captioner.lm.unembed is captioner.language_model.lm_head


def test_grad_attribution_matches_captum_at_the_image_positions(llava_dir, tiny_llava_sizes):
    """Z * dy/dZ over every unit of both layers at the 9 image positions (3..11 of the chat prompt),
    against captum's LayerGradientXActivation on LlavaForConditionalGeneration's own forward from
    the processor's ids and pixels."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    captioner = load_llava(llava_dir, dtype="float32")
    reference = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    inputs = AutoProcessor.from_pretrained(llava_dir)(images=images(2), text=[captioner.prompt] * 2,
                                                       return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    positions, targets = torch.tensor([n_prompt - 1, n_prompt - 4]), torch.tensor([20, 9])
    layers = list(range(tiny_llava_sizes.n_layers))
    ours = grad_attribution(captioner.lm, captioner.input_embeddings(inputs["pixel_values"]), positions, targets,
                            layers, captioner.image_positions)  # [2, L, 9, d_mlp]

    def target_logit(pixel_values):
        logits = reference(input_ids=inputs["input_ids"], pixel_values=pixel_values).logits
        return logits[torch.arange(2), positions, targets]

    captum = LayerGradientXActivation(target_logit, [reference.model.language_model.layers[layer].mlp.gate_proj
                                                     for layer in layers])
    image = inputs["input_ids"][0] == reference.config.image_token_id  # where the processor put the image
    theirs = torch.stack([a[:, image] for a in captum.attribute(inputs["pixel_values"])], dim=1)
    assert ours.shape == (2, len(layers), 9, tiny_llava_sizes.d_mlp) and ours.abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_a_planted_unit_is_found_decoded_and_ablated_at_the_image_positions(planted_dir):
    captioner = load_llava(planted_dir, dtype="float32")
    lm, layers = captioner.lm, [0, 1]
    targets, scores = caption_and_attribute(captioner, captioner.preprocess(images(3)), get_finder("lexicon"),
                                            "grad", layers, max_new_tokens=3)
    assert [row["noun"] for row in targets.rows] == ["circle"] * 3
    assert (targets.target_positions == captioner.n_prompt - 1).all()  # c is the caption's first token
    p_before = torch.tensor([row["p_target"] for row in targets.rows])
    assert (p_before > 0.9).all()

    decoder = UnitDecoder(lm, InterpretableFilter(top_k=3, min_words=1))
    settings = []
    for i, image_scores in scores.items():  # [L, 9, d_mlp]
        ranking = unit_ranking(image_scores, layers)
        assert ranking[0].tolist() == [PLANTED_LAYER, PLANTED_UNIT]
        settings.append(ablation_settings(ranking, decoder.interpretable_units(ranking, 1), [0, 1], lm.d_mlp,
                                          torch.Generator().manual_seed(i)))
    assert decoder(PLANTED_LAYER, PLANTED_UNIT)[0][0] == "circle"

    inputs, positions, ids = targets.inputs_embeds, targets.target_positions, targets.target_ids
    for ablated_positions in (None, captioner.image_positions):  # everywhere, and at the image prompts only
        results = ablation_sweep(lm, inputs, positions, ids, settings, layers, n_prompt=targets.n_prompt,
                                 max_new_tokens=3, positions=ablated_positions)
        for image, image_results in enumerate(results):
            by_arm = {(r["arm"], r["k"]): r for r in image_results}
            assert by_arm[("top", 0)]["p_target"] == pytest.approx(p_before[image].item(), rel=1e-5)
            assert by_arm[("top", 1)]["p_target"] < 0.1 * p_before[image]  # at least 90% lower
            assert by_arm[("top", 1)]["caption_ids"] != targets.rows[image]["caption_ids"]
            assert abs(by_arm[("random", 1)]["p_target"] / p_before[image] - 1) < 0.1
    # the text before the image (what "the first n positions" would partly hit) holds none of its effect
    with torch.no_grad(), ablate(lm, {PLANTED_LAYER: [PLANTED_UNIT]}):
        everywhere = target_probabilities(lm, inputs, positions, ids)
    mask = torch.zeros(lm.d_mlp, dtype=torch.bool)
    mask[PLANTED_UNIT] = True
    with torch.no_grad(), ablate_masks(lm, {PLANTED_LAYER: mask}, positions=slice(0, PREFIX)):
        before_image = target_probabilities(lm, inputs, positions, ids)
    torch.testing.assert_close(before_image, p_before, rtol=1e-5, atol=0)
    assert (everywhere < 0.1 * p_before).all()


def test_receptive_fields_read_the_image_positions_on_the_patch_grid(planted_dir):
    """The planted unit's activation maps are its A at positions 3..11, laid on the 3 x 3 grid
    row-major; resize_mode="squash" gives the geometry receptive fields need."""
    captioner = load_llava(planted_dir, dtype="float32", resize_mode="squash")
    assert captioner.encoder.resize_mode == "squash"
    pixels = captioner.preprocess(images(2))
    seen = []
    hook = captioner.lm.mlp_out(PLANTED_LAYER).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        maps = unit_activation_maps(captioner, pixels, [(PLANTED_LAYER, PLANTED_UNIT), (1, 3)])
    finally:
        hook.remove()
    assert maps.shape == (2, 2, 3, 3)
    direct = seen[0][:, PREFIX : PREFIX + 9, PLANTED_UNIT].reshape(2, 3, 3)
    torch.testing.assert_close(maps[:, 0], direct)
    assert maps[:, 0].min() > 10 and seen[0][:, :PREFIX, PLANTED_UNIT].abs().max() < 1e-3  # fires on the image only


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    from mmn.world.generator import write_coco_split

    root = tmp_path_factory.mktemp("coco")
    write_coco_split(root, n_images=3, seed=0)
    return root


def test_analyze_with_model_llava_runs_end_to_end(planted_dir, coco_split, tmp_path):
    """`python analyze.py model=llava lm.name_or_path=<folder>`: the same procedure, tables and
    cards as for LiMBeR; the planted unit is every image's top neuron and its ablation removes c."""
    from mmn.recipes.analyze import analyze

    cfg = compose(["model=llava", f"lm.name_or_path={planted_dir}", "lm.dtype=float32", "data=coco",
                   f"data.eval.root={coco_split}", "images.n=3", "images.batch_size=2", "ablation.ks=[0,1,4]",
                   "top_n=5", "max_new_tokens=3", "device=cpu", "logger=none", f"paths.output_dir={tmp_path}"],
                  config_name="analyze")
    assert cfg.projection.checkpoint == str(planted_dir) and cfg.encoder.name_or_path == str(planted_dir)
    summary = analyze(cfg)
    captions = pd.read_parquet(tmp_path / "captions.parquet")
    neurons = pd.read_parquet(tmp_path / "neurons.parquet")
    ablation = pd.read_parquet(tmp_path / "ablation.parquet")
    assert summary["images_analysed"] == 3 and set(captions["noun"]) == {"circle"}
    assert summary["analysed_units"] == 2 * 48
    best = neurons[neurons["rank"] == 0]
    assert set(best["neuron"]) == {"L0.u7"} and best["patch"].between(0, 8).all()
    top = ablation[(ablation["arm"] == "top") & (ablation["k"] == 1)]
    assert (top["delta_p"] < -0.9).all()
    assert len(pd.read_parquet(tmp_path / "cards.parquet")) > 0  # maps on the 3 x 3 grid


def test_llava_settings_are_checked_with_their_keys(llava_dir, save_tiny_beit, tmp_path):
    from mmn.recipes.run import load_captioner

    with pytest.raises(ValueError, match="is a LLaVA checkpoint, whose vision tower is the encoder"):
        load_captioner(compose(["model=llava", f"lm.name_or_path={llava_dir}", "encoder=shapes"],
                               config_name="analyze"))
    with pytest.raises(ValueError, match="LLaVA checkpoint: its vision tower loads together with its language"):
        load_encoder("clip_vision", llava_dir)
    save_tiny_beit(tmp_path / "beit")
    with pytest.raises(ValueError, match="is not a LLaVA checkpoint"):
        load_llava(tmp_path / "beit")
    with pytest.raises(FileNotFoundError, match="LLaVA checkpoint not found"):
        load_llava(tmp_path / "missing")
    import json

    config = json.loads((llava_dir / "config.json").read_text())
    for key, value, message in [("vision_feature_select_strategy", "full", "the captioner drops the CLS token"),
                                ("projector_hidden_act", "relu", "mlp2x_gelu is LLaVA 1.5's")]:
        (tmp_path / key).mkdir()
        (tmp_path / key / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=f"{key}='{value}'.*{message}"):  # before any weight loads
            load_llava(tmp_path / key)


def test_the_papers_other_recipes_run_through_model_llava(tiny_world, planted_dir, tmp_path):
    """Table 2 (prompt decoding), Table 1 (neuron scores) and Figure 5 (receptive fields, with the
    tower squash-resizing) on the tiny Shapes world's images and CLIP, with the planted LLaVA."""
    from mmn.recipes.analyze import analyze
    from mmn.recipes.neuron_scores import neuron_scores
    from mmn.recipes.prompt_decoding import prompt_decoding
    from mmn.recipes.receptive_fields import receptive_field_experiment

    world = [o for o in tiny_world if not o.startswith("training=")]
    common = [*world, "model=llava", f"lm.name_or_path={planted_dir}", "lm.dtype=float32", "device=cpu",
              "max_new_tokens=3", "images.n=4", "images.batch_size=4", "logger=none"]  # Table 2's KS tests: 4+
    prompt_decoding(compose([*common, f"paths.output_dir={tmp_path / 'prompts'}"], config_name="prompt_decoding"))
    scores = pd.read_parquet(tmp_path / "prompts" / "scores.parquet")
    assert (scores[scores["kind"] == "prompt"].groupby("image_id").size() == 9).all()  # one text per image prompt
    assert set(scores.loc[scores["kind"] == "caption", "text"].str.split().str[0]) == {"circle"}

    analyze(compose([*common, f"paths.output_dir={tmp_path / 'analysis'}", "ablation.ks=[0]", "top_n=5",
                     "filter.min_words=0", "cards.images=0"], config_name="analyze"))
    table1 = neuron_scores(compose([*common, f"paths.output_dir={tmp_path / 'scores'}",
                                    f"analysis={tmp_path / 'analysis'}"], config_name="neuron_scores"))
    assert table1["images"] == 4 and 0 <= table1["neuron/clipscore"] <= 100

    figure5 = receptive_field_experiment(compose([*common, f"paths.output_dir={tmp_path / 'fields'}",
                                                  "encoder.resize_mode=squash", "receptive_fields.units=2",
                                                  "receptive_fields.interpretable=false",
                                                  "receptive_fields.heatmaps=1"], config_name="receptive_fields"))
    ious = pd.read_parquet(tmp_path / "fields" / "ious.parquet")
    assert figure5["images"] >= 1 and set(ious["arm"]) == {"top", "random"} and ious["iou"].between(0, 1).all()
    assert "L0.u7" in set(ious.loc[ious["arm"] == "top", "neuron"])


def test_train_py_trains_a_fresh_projector_for_a_llavas_tower_and_lm_which_analyses_load(tiny_world, llava_dir,
                                                                                          tmp_path):
    """`python train.py model=llava projection.checkpoint=null` (LLaVA's stage 1 on the tiny world's
    pairs, with the chat prompt around the image): only the projector trains, and the folder it
    writes takes the place of the LLaVA's own projector in the analyses."""
    from mmn.models.projection import Projection
    from mmn.recipes.run import load_captioner
    from mmn.recipes.train import train

    llava = ["model=llava", f"lm.name_or_path={llava_dir}", "lm.dtype=float32"]
    summary = train(compose([*tiny_world, *llava, "projection.checkpoint=null", "training.with_prompt=true",
                             "logger=none", f"paths.output_dir={tmp_path}"]))
    trained = Projection.load(tmp_path / "projection")
    assert summary["steps"] == 6 and (trained.kind, trained.d_enc, trained.d_lm) == ("mlp2x_gelu", 16, 24)
    own = load_llava(llava_dir, dtype="float32").projection
    assert not torch.equal(trained.linear.weight, own.linear.weight)
    captioner = load_captioner(compose([*llava, f"projection.checkpoint={tmp_path / 'projection'}",
                                        "lm.dtype=bfloat16"], config_name="analyze"))
    assert torch.equal(captioner.projection.linear_2.weight, trained.linear_2.weight)  # float32, as trained
    assert captioner.lm.dtype == torch.bfloat16 and captioner.input_embeddings(
        captioner.preprocess(images(1))).dtype == torch.bfloat16
    assert captioner.image_positions == slice(PREFIX, PREFIX + 9)
