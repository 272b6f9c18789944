"""Every option of every config group composes and resolves."""

import pytest
from omegaconf import OmegaConf

from mmn.config import CONFIG_DIR, compose

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
OPTIONS = [(group, option.stem) for group in GROUPS for option in sorted((CONFIG_DIR / group).glob("*.yaml"))]
ANALYSIS_GROUPS = {"attribution", "layers", "filter", "ablation", "clip"}  # composed by analyze.yaml
GLOBAL_GROUPS = {"experiment", "model"}  # `# @package _global_`: they set keys of other groups


def test_groups_mirror_the_code():
    assert {"lm", "encoder", "projection", "data", "world", "training", "trainer", "logger", *GLOBAL_GROUPS,
            *ANALYSIS_GROUPS} <= set(GROUPS)
    for preset in ["lm/gptj_6b", "lm/gpt2", "lm/pythia", "lm/llama", "encoder/beit_large",
                   "encoder/clip_rn50x16", "encoder/nfrn50", "encoder/vit_random", "data/cc3m", "data/coco",
                   "training/limber", "training/shapes", "trainer/cpu", "trainer/gpu", "trainer/ddp", "trainer/fsdp",
                   "logger/wandb", "logger/csv", "logger/none", "experiment/limber_beit_gptj", "model/llava",
                   "lm/llava_1_5_7b", "encoder/llava", "encoder/clip_vit_l14_336"]:
        assert (CONFIG_DIR / f"{preset}.yaml").is_file(), preset


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(group, option):
    cfg = compose([f"{group}={option}"], config_name="analyze" if group in ANALYSIS_GROUPS else "config")
    # Resolving raises on any interpolation that does not resolve or value left missing.
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    written = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    if group in GLOBAL_GROUPS:  # a global recipe: the same as choosing its groups by hand, plus its own keys
        choices = [f"{key.split('/')[-1]}={value}" for entry in written["defaults"] for key, value in entry.items()]
        by_hand = OmegaConf.merge(compose(choices), {k: v for k, v in written.items() if k != "defaults"})
        assert resolved == OmegaConf.to_container(by_hand, resolve=True)
        return
    keys = set(written) - {"defaults"}
    if "defaults" in written:  # extends another option of its group
        assert keys <= set(resolved[group])
    else:
        assert keys == set(resolved[group])
    for key, value in written.items():
        if isinstance(value, (int, float, str)) and "${" not in str(value):
            assert resolved[group][key] == value, (group, option, key)


def test_world_folder_is_keyed_by_its_configuration():
    base = compose()
    other = compose(["world.seed=1"])
    assert base.world.dir != other.world.dir
    assert base.lm.name_or_path == f"{base.world.dir}/lm"
    assert compose().world.dir == base.world.dir


def test_the_world_config_is_the_builders_defaults():
    import json

    from mmn.world.settings import DEFAULT_WORLD

    world = OmegaConf.to_container(compose().world, resolve=True)
    del world["dir"], world["shipped"]
    assert world == json.loads(json.dumps(DEFAULT_WORLD))  # tuples as lists, as YAML has them


def test_the_paper_analysis_config_keeps_the_papers_unit_counts():
    paper, world = compose(config_name="analyze_gptj"), compose(config_name="analyze")
    assert paper.lm.name_or_path == "EleutherAI/gpt-j-6b" and paper.encoder.kind == "beit"
    assert list(paper.ablation.ks) == [0, 50, 100, 200, 400, 800, 1600, 3200, 6400]
    assert all(str(size).endswith("%") for size in world.ablation.ks)  # the world's curve is in shares
