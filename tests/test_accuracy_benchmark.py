"""The statistics behind docs/results.md: the paired bootstrap CI of MRKD - RD4AD and the partial report."""

import numpy as np
import pytest
from helpers import load_benchmark
from sklearn.metrics import roc_auc_score


def run_result(labels, scores) -> dict:
    return {"scores": {f"img{i:03d}": (int(y), float(s)) for i, (y, s) in enumerate(zip(labels, scores))}}


@pytest.mark.slow  # thousands of bootstrap resamples
def test_identical_methods_give_a_zero_difference_and_a_zero_width_interval():
    accuracy = load_benchmark("accuracy")
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30), np.ones(30)]
    runs = [run_result(labels, rng.normal(size=60) + labels) for _ in range(3)]
    diff, low, high = accuracy.paired_bootstrap(runs, runs, resamples=200)
    assert (diff, low, high) == (0.0, 0.0, 0.0)


@pytest.mark.slow  # thousands of bootstrap resamples
def test_a_clearly_better_method_has_an_interval_above_zero_around_the_observed_difference():
    accuracy = load_benchmark("accuracy")
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(40), np.ones(40)]
    better, worse = [], []
    for _ in range(3):
        better.append(run_result(labels, labels + 0.3 * rng.normal(size=80)))
        worse.append(run_result(labels, labels + 2.0 * rng.normal(size=80)))
    expected = np.mean([roc_auc_score(labels, [s for _, s in b["scores"].values()])
                        - roc_auc_score(labels, [s for _, s in w["scores"].values()])
                        for b, w in zip(better, worse)])
    diff, low, high = accuracy.paired_bootstrap(better, worse, resamples=300)
    assert diff == pytest.approx(expected)
    assert 0 < low < diff < high
    reverse = accuracy.paired_bootstrap(worse, better, resamples=300)
    assert reverse[0] == pytest.approx(-diff) and reverse[2] < 0


def test_runs_that_do_not_share_their_test_images_are_refused():
    accuracy = load_benchmark("accuracy")
    a = run_result([0, 1], [0.1, 0.9])
    b = {"scores": {"other0": (0, 0.1), "other1": (1, 0.9)}}
    with pytest.raises(ValueError, match="share their test images"):
        accuracy.paired_bootstrap([a], [b], resamples=10)


@pytest.mark.slow  # thousands of bootstrap resamples
def test_a_partial_report_pairs_only_the_seeds_both_methods_have(tmp_path):
    accuracy = load_benchmark("accuracy")
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(20), np.ones(20)]
    results = {}
    for seed in (1, 2):
        for variant in ("MRKD", "RD4AD"):
            if (seed, variant) == (2, "RD4AD"):
                continue  # not done yet
            result = run_result(labels, labels + rng.normal(size=40))
            result.update(image_auroc=0.5, pixel_auroc=None, aupro=None, aupro_per_image=None, n_normal=20,
                          n_anomalous=20, train_seconds=None)
            results[accuracy.Run("elpv:mono", variant, seed)] = result
    runs = list(results)
    out = tmp_path / "results.md"
    accuracy.write_markdown(results, runs, [1, 2], out, "main", tmp_path, [], ["--report"])
    text = out.read_text()
    assert "| elpv:mono | MRKD | 2 |" in text and "| elpv:mono | RD4AD | 1 |" in text
    assert "| elpv:mono (1 seed) |" in text


def test_the_patchcore_section_pairs_mrkd_where_it_exists_and_replaces_only_itself(tmp_path):
    accuracy = load_benchmark("accuracy")
    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(20), np.ones(20)]
    results = {}
    for dataset, variants in (("textures:grass", ("PatchCore 10%", "MRKD")), ("elpv:mono", ("PatchCore 10%",)),
                              ("elpv:poly", ("PatchCore 1%", "MRKD"))):
        for variant in variants:
            result = run_result(labels, labels * (2.0 if variant == "MRKD" else 0.2) + rng.normal(size=40))
            result.update(image_auroc=0.5, pixel_auroc=0.9, aupro=0.8 if variant == "MRKD" else 0.7,
                          aupro_per_image=0.7, n_normal=20, n_anomalous=20, train_seconds=3.0)
            if variant != "MRKD":
                result.update(cpu_ms_per_image=12.0, bank_size=600, bank_mb=2.3, fit_cpu_seconds=3.0,
                              config={"target_dim": 1024})
            results[accuracy.Run(dataset, variant, 111)] = result
    out = tmp_path / "results.md"
    out.write_text("# Results\n\ntable\n\n<!-- notes: kept when this file is regenerated -->\nnotes\n")
    runs = list(results)
    accuracy.write_section(accuracy.patchcore_section(results, runs, [111], ["--study", "patchcore"], 200), out)
    first = out.read_text()
    assert first.startswith("# Results\n\ntable\n") and "\nnotes\n" in first
    assert "| textures:grass | PatchCore 10% | 1 |" in first and "600 x 1024 (2 MB)" in first
    assert "on MRKD's teacher (mobilenet_v2)" in first
    named = accuracy.patchcore_section(results, runs, [111], [], 200, teacher="efficientnet_lite0")
    assert "on MRKD's teacher (efficientnet_lite0)" in named[1]
    grass = next(line for line in first.splitlines() if line.startswith("| textures:grass | PatchCore 10% | 111 |"))
    assert "MRKD better" in grass and grass.endswith("| +0.100 |")
    poly = next(line for line in first.splitlines() if line.startswith("| elpv:poly | PatchCore 1% | 111 |"))
    assert "MRKD better" in poly  # no 10% bank there: paired with the 1% bank
    assert "| elpv:mono | - | none |" in first
    accuracy.write_section(accuracy.patchcore_section(results, runs[:1], [111], ["--study", "patchcore"], 200), out)
    second = out.read_text()
    assert second.count(accuracy.PATCHCORE_SECTION[0]) == 1 and "| elpv:mono | - | none |" not in second
    assert second.startswith("# Results\n\ntable\n") and "\nnotes\n" in second


def test_a_run_made_with_other_map_settings_is_found_and_a_current_one_is_not(tmp_path, tiny_checkpoint):
    """What makes the benchmark re-score a finished run (no training) after the product's map defaults changed."""
    import shutil

    from mrkd.runtime.checkpoint import load_checkpoint, save_checkpoint

    accuracy = load_benchmark("accuracy")
    old, new = accuracy.Run("elpv:poly", "MRKD", 5), accuracy.Run("elpv:mono", "MRKD", 5)
    payload = load_checkpoint(tiny_checkpoint, for_inference=False)  # made with today's defaults
    before = dict(payload, model_config=payload["model_config"] | {"map_scales": [1, 2], "score_scales": [1, 2],
                                                                   "feature_pool": 1})
    for run, data in ((old, before), (new, payload)):
        folder = tmp_path / run.folder
        (folder / "eval").mkdir(parents=True)
        save_checkpoint(folder / "checkpoint.pt", data)
        (folder / "eval" / "metrics.json").write_text("{}")
    assert accuracy.stale_map_settings(new, tmp_path, []) is None
    changed = accuracy.stale_map_settings(old, tmp_path, [])
    assert changed == "feature_pool 1 -> 3, map_scales (1, 2) -> (0, 1, 2), score_scales (1, 2) -> (2,)"
    save_checkpoint(tmp_path / new.folder / "checkpoint.pt", dict(payload, score_reference=None))
    assert accuracy.stale_map_settings(new, tmp_path, []) == "score_reference off -> on"
    assert accuracy.stale_map_settings(new, tmp_path, ["--score-reference", "off"]) is None
    shutil.rmtree(tmp_path / old.folder / "eval")
    assert accuracy.stale_map_settings(old, tmp_path, []) is None  # not finished: trained as usual, not re-scored


def test_both_methods_get_the_teacher_and_a_run_of_another_teacher_is_refused(tmp_path, tiny_checkpoint):
    """--backbone goes to mrkd.train and to PatchCore alike; a finished run of another teacher in the same --out is
    an error, not a row of the wrong teacher."""
    from mrkd.runtime.checkpoint import load_checkpoint, save_checkpoint

    accuracy = load_benchmark("accuracy")
    run, peer = accuracy.Run("elpv:mono", "MRKD", 5), accuracy.Run("elpv:mono", "PatchCore 1%", 5)
    shared = ["--backbone", "efficientnet_lite2"]
    train, _ = run.commands(tmp_path, ["--steps", "3", *shared])
    assert train[train.index("--backbone") + 1] == "efficientnet_lite2"
    command = peer.patchcore_command(tmp_path, shared)
    assert command[command.index("--backbone") + 1] == "efficientnet_lite2" and "--steps" not in command
    payload = load_checkpoint(tiny_checkpoint, for_inference=False)
    assert payload["model_config"]["backbone"] != "efficientnet_lite2"
    folder = tmp_path / run.folder
    (folder / "eval").mkdir(parents=True)
    save_checkpoint(folder / "checkpoint.pt", payload)
    (folder / "eval" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="trained with the .* teacher, not efficientnet_lite2: give each teacher"):
        accuracy.stale_map_settings(run, tmp_path, shared)


def test_the_peer_is_the_bank_with_the_most_seeds_paired_with_mrkd():
    """ELPV's 10% bank costs tens of CPU minutes: one 10% seed must not replace three paired 1% seeds."""
    accuracy = load_benchmark("accuracy")
    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(20), np.ones(20)]
    results = {}
    for variant, seeds in (("MRKD", (111, 112, 113)), ("PatchCore 1%", (111, 112, 113)), ("PatchCore 10%", (111,))):
        for seed in seeds:
            result = run_result(labels, labels + rng.normal(size=40))
            result.update(image_auroc=0.5, pixel_auroc=None, aupro=None, aupro_per_image=None, n_normal=20,
                          n_anomalous=20, train_seconds=3.0, cpu_ms_per_image=1.0, bank_size=6, bank_mb=0.1,
                          fit_cpu_seconds=1.0, config={"target_dim": 8})
            results[accuracy.Run("elpv:mono", variant, seed)] = result
    lines = accuracy.patchcore_section(results, list(results), [111, 112, 113], [], 200)
    assert any(line.startswith("| elpv:mono | PatchCore 1% | 111, 112, 113 |") for line in lines)
    del results[accuracy.Run("elpv:mono", "PatchCore 1%", 112)], results[accuracy.Run("elpv:mono", "PatchCore 1%", 113)]
    lines = accuracy.patchcore_section(results, list(results), [111, 112, 113], [], 200)
    assert any(line.startswith("| elpv:mono | PatchCore 10% | 111 |") for line in lines)  # a tie: the 10% bank
