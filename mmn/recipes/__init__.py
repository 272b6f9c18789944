"""The recipes: each paper result as a function of a Hydra config, composed from the library
(mmn.models, mmn.analysis, mmn.training) on the run backbone (run.py: Run, the config adapters,
the settings checks). The entry points at the repository's root and in experiments/ call these.

    train.py             python train.py                          the projection (LiMBeR's recipe)
    analyze.py           python analyze.py                        sections 2 and 3.3: neurons, ablation
    prompt_decoding.py   python experiments/prompt_decoding.py    section 3.1, Table 2
    neuron_scores.py     python experiments/neuron_scores.py      Table 1
    receptive_fields.py  python experiments/receptive_fields.py   section 3.2, Figure 5
    selectivity.py       python experiments/selectivity.py        supplement S.4
    report.py            python experiments/report.py             runs side by side
    loggers.py           W&B / CSV loggers of every recipe
"""
