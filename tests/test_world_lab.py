"""benchmarks/world_lab.py on the tiny world: one command trains a projection and reports the
encoder probes, the captioner's accuracy, image-position ablations and what P and the MLPs write."""

import importlib.util
import json

from mmn.config import CONFIG_DIR, analysis_overrides

spec = importlib.util.spec_from_file_location("world_lab", CONFIG_DIR.parent / "benchmarks" / "world_lab.py")
world_lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(world_lab)


def test_world_lab_reports_what_causes_what(tiny_world, tmp_path):
    result = world_lab.main(tiny_world, root=tmp_path)
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
