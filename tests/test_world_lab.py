"""benchmarks/world_lab.py on the tiny world: one command trains a projection and reports the
encoder probes, the captioner's accuracy, image-position ablations and what P and the MLPs write."""

import importlib.util
import json

from mmn.config import CONFIG_DIR, analysis_overrides

spec = importlib.util.spec_from_file_location("world_lab", CONFIG_DIR.parent / "benchmarks" / "world_lab.py")
world_lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(world_lab)


def test_world_lab_reports_what_causes_what(tiny_world, tmp_path):
    # an LM of 40 steps, not the tiny world's 5: it names a shape, so p(c) has captions to average
    result = world_lab.main([*tiny_world, "world.lm.steps=40"], root=tmp_path)
    assert set(result["probes"]) >= {"shape_linear", "shape_mlp", "colour_linear", "glyph_linear"}
    assert 0 <= result["first_noun_accuracy"] <= 1 and 0 < result["p_target_mean"] < 1
    assert result["analysed_units"] == 2 * 128  # the tiny LM: 2 layers of 128 units
    # 1.5% of 256 units is 4; 100% ablates every unit at the image positions, in every arm alike
    assert set(result["image_positions"]) == {f"{arm}/k={k}/delta_p" for arm in ("top", "top_interpretable", "random")
                                              for k in (4, 256)}
    assert result["image_positions"]["top/k=256/delta_p"] == result["image_positions"]["random/k=256/delta_p"]
    assert result["norms"]["prompt"] > 0 and len(result["norms"]["mlp"]) == 2
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1]) == json.loads(json.dumps(result))
    assert analysis_overrides(["world.seed=1", "training=tiny", "training.lr=0.1", "+trainer.x=1"]) == ["world.seed=1"]


parts_spec = importlib.util.spec_from_file_location("world_parts_lab",
                                                    CONFIG_DIR.parent / "benchmarks" / "world_parts_lab.py")
world_parts_lab = importlib.util.module_from_spec(parts_spec)
parts_spec.loader.exec_module(world_parts_lab)


def test_world_parts_lab_trains_one_part_and_reports_its_fitness(tmp_path):
    lm = world_parts_lab.main(["lm", "n_texts=200", "n_eval_texts=100", "vocab_size=400", "n_layer=1", "n_embd=32",
                               "n_head=2", "rotary_dim=8", "n_inner=64", "n_positions=96", "seq_len=64", "steps=3",
                               "warmup_steps=1", "seed=1"], root=tmp_path)
    assert 0 <= lm["context_copy_accuracy"] <= 1 and lm["eval_loss"] > 0 and lm["config"]["steps"] == 3
    clip = world_parts_lab.main(["clip", "n_pairs=32", "n_eval_pairs=20", "retrieval_pool=10", "embed_dim=16",
                                 "image_size=32", "vision_layers=[1,1,1,1]", "vision_width=8", "context_length=16",
                                 "text_width=32", "text_heads=2", "text_layers=1", "batch_size=16", "steps=2",
                                 "warmup_steps=1", "scenes.image_size=64"], root=tmp_path)
    assert clip["config"]["vision_layers"] == [1, 1, 1, 1]
    assert set(clip["swap_accuracy"]) == {"shape", "colour"}
    assert all(0 <= clip[f"clipscore_{kind}"] <= 100 for kind in ("caption", "noun", "random_words"))
    assert 0 <= clip["ks_noun_vs_random_words"]["D"] <= 1
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["part"] for entry in logged] == ["lm", "clip"] and logged[1]["overrides"][0] == "n_pairs=32"
