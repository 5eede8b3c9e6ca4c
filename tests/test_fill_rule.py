"""Fill rules of the transfer (issue 8): overlap of each pair's init with the general init, recorded
in transfer.json and the report, and the `exclude-general` rule that keeps a pair's fill off it."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from mlas_lora.experiments import stages
from mlas_lora.experiments.config import ExperimentConfig, LoraSettings
from mlas_lora.experiments.run import method_diagnostics
from mlas_lora.models.arch import PROJECTIONS, ArchInfo, describe
from mlas_lora.testing.tiny import save_tiny, tiny_model
from mlas_lora.transfer.extract import (
    choose_init,
    general_ranking,
    index_mask,
    is_head_side,
    overlap_record,
    rank_indices,
    select_side,
    specific_ranking,
)
from mlas_lora.transfer.transfer import load_factors, transfer_factors

PAIRS = ["en-de", "en-zh", "de-en"]
QWEN_15B = ArchInfo("qwen2", 28, 1536, 8960, 12, 2, 128)
QWEN_05B = ArchInfo("qwen2", 24, 896, 4864, 14, 2, 64)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- by hand


def test_rank_indices_fill_avoids_but_takes_candidates_first():
    scores = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.8])
    mask = torch.tensor([True, False, True, True, False, False])
    avoid = torch.tensor([False, True, False, True, False, False])  # 3 is a candidate: still first
    assert rank_indices(scores, mask, 4)[0].tolist() == [0, 1, 2, 3]  # ranked: best other 1 (0.9)
    idx, filled = rank_indices(scores, mask, 4, avoid)
    assert idx.tolist() == [0, 2, 3, 5] and filled == 1  # 1 avoided: 5 (0.8) fills instead
    idx, filled = rank_indices(scores, mask, 6, avoid)
    assert idx.tolist() == [0, 1, 2, 3, 4, 5] and filled == 3  # too few others: 1 taken after all


def _gate_sides(phi, classes, pair_index=None):
    rank = general_ranking(phi, classes) if pair_index is None else specific_ranking(phi, classes, pair_index)
    return {"out": (torch.rand(4), torch.zeros(4, dtype=torch.bool)), "in": rank}


def test_overlap_and_exclusion_on_a_constructed_case():
    """gate columns 6 -> 3: general {0, 1, 5}; pair 1 has candidates {3, 4} and fills one column."""
    info_t, info_s = ArchInfo("llama", 1, 6, 4, 2, 2, 3), ArchInfo("llama", 1, 3, 2, 1, 1, 3)
    phi = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [3.0, 0.0, 1.0, 0.0, 9.0, 2.0]])
    classes = torch.tensor([-1, -1, 0, 1, 1, -1])
    general = choose_init("gate", _gate_sides(phi, classes), {}, "ranked", info_t, info_s)
    assert general["in"].indices.tolist() == [0, 1, 5]
    sides = _gate_sides(phi, classes, 1)
    ranked = choose_init("gate", sides, general, "ranked", info_t, info_s)
    assert ranked["in"].indices.tolist() == [0, 3, 4]  # fills with 0 (score 3), a general column
    record = overlap_record(ranked, general, sides, "ranked")
    assert record["overlap_cols"] == {"count": 1, "fraction": pytest.approx(1 / 3), "in_fill": 1}
    assert record["fill_rule_cols"] == "ranked"
    excluded = choose_init("gate", sides, general, "exclude-general", info_t, info_s)
    assert excluded["in"].indices.tolist() == [2, 3, 4]  # candidates 3, 4, then the best non-general
    record = overlap_record(excluded, general, sides, "exclude-general")
    assert record["overlap_cols"] == {"count": 0, "fraction": 0.0, "in_fill": 0}
    assert record["fill_rule_cols"] == "exclude-general"


def test_exclusion_says_so_when_too_few_others_remain():
    """gate columns 6 -> 4: the general init takes 4, so a pair without candidates must reuse 2."""
    info_t, info_s = ArchInfo("llama", 1, 6, 4, 2, 2, 3), ArchInfo("llama", 1, 4, 2, 1, 1, 4)
    phi = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    classes = torch.tensor([-1, -1, -1, -1, -1, -1])
    general = choose_init("gate", _gate_sides(phi, classes), {}, "ranked", info_t, info_s)
    sides = _gate_sides(phi, classes, 0)
    chosen = choose_init("gate", sides, general, "exclude-general", info_t, info_s)
    assert chosen["in"].n_filled_avoided == 2
    record = overlap_record(chosen, general, sides, "exclude-general")
    assert record["overlap_cols"]["count"] == 2
    assert (
        record["fill_rule_cols"]
        == "exclude-general (2 filled from the general init's choice: too few others)"
    )


@pytest.mark.parametrize("proj,forced", [("q", 2 * 128), ("k", 0)])
def test_head_rule_exclusion_on_qwen25_15b_to_05b(proj, forced):
    """q: 768 teacher dims a group, 448 chosen by each init, so 2 x 128 must be shared; k: none."""
    n = QWEN_15B.projection_shape(proj)[0]
    gen = torch.Generator().manual_seed(2)
    scores, mask = torch.rand(n, generator=gen), torch.rand(n, generator=gen) < 0.5
    general = select_side(proj, "out", scores, mask, QWEN_15B, QWEN_05B)
    no_candidates = torch.zeros(n, dtype=torch.bool)
    pair_scores = torch.rand(n, generator=gen)
    ranked = select_side(proj, "out", pair_scores, no_candidates, QWEN_15B, QWEN_05B)
    avoid = index_mask(general.indices, n)
    excluded = select_side(proj, "out", pair_scores, no_candidates, QWEN_15B, QWEN_05B, avoid)
    assert excluded.rule == "gqa-rotary" and excluded.indices.numel() == general.indices.numel()
    shared = int(torch.isin(excluded.indices, general.indices).sum())
    assert shared == excluded.n_filled_avoided == forced
    assert int(torch.isin(ranked.indices, general.indices).sum()) > shared
    t_dim, s_dim = 128, 64
    rows = excluded.indices.tolist()
    for h in range(len(rows) // s_dim):  # still whole rotary pairs of one teacher head per student head
        head = rows[h * s_dim : (h + 1) * s_dim]
        assert len({r // t_dim for r in head}) == 1
        assert [r + t_dim // 2 for r in head[: s_dim // 2]] == head[s_dim // 2 :]


# ---------------------------------------------------------------- driver, transfer.json


def _write_inputs(folder, teacher: ArchInfo, selected, seed=0):
    """Awareness + classes files where most neurons are general, so pairs fill a lot."""
    gen = torch.Generator().manual_seed(seed)
    phi, classes = {}, {}
    for layer in range(teacher.num_layers):
        for proj in PROJECTIONS:
            for side, n in zip(("out", "in"), teacher.projection_shape(proj), strict=True):
                phi[f"phi.{layer}.{proj}.{side}"] = torch.rand(len(PAIRS), n, generator=gen)
                draw = torch.rand(n, generator=gen)
                cls = torch.randint(0, len(PAIRS), (n,), generator=gen)
                classes[f"class.{layer}.{proj}.{side}"] = torch.where(draw < 0.7, -1, cls)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(phi, str(folder / "awareness.safetensors"))
    save_file(classes, str(folder / "classes.safetensors"))
    (folder / "awareness.json").write_text(json.dumps({"pairs": PAIRS, "selected_layers": selected}))
    (folder / "classes.json").write_text(json.dumps({"lambda": 0.5, "pairs": PAIRS}))
    return classes


@pytest.fixture(scope="module")
def two_rules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fill")
    teacher, student = tiny_model("qwen2", "teacher"), tiny_model("qwen2", "student")
    classes = _write_inputs(folder, describe(teacher), [0, 2])
    run = {
        rule: transfer_factors(teacher, student, folder, folder, None, 4, 2, progress=False, fill_rule=rule)
        for rule in ("ranked", "exclude-general")
    }
    return run, classes


def test_overlap_is_recorded_per_submatrix_and_per_pair(two_rules):
    run, _ = two_rules
    for rule, factors in run.items():
        assert factors.meta["fill_rule"] == rule
        subs = factors.meta["submatrices"]
        for (layer, proj), by_name in factors.indices.items():
            g_rows, g_cols = by_name["general"]
            assert "overlap_rows" not in subs[f"{layer}.{proj}.general"]
            for pair in PAIRS:
                rows, cols = by_name[pair]
                record = subs[f"{layer}.{proj}.{pair}"]
                for axis, mine, theirs in (("rows", rows, g_rows), ("cols", cols, g_cols)):
                    count = int(torch.isin(mine, theirs).sum())
                    assert record[f"overlap_{axis}"]["count"] == count
                    assert record[f"overlap_{axis}"]["fraction"] == pytest.approx(count / mine.numel())
        summary = factors.meta["overlap_with_general"]
        assert set(summary) == set(PAIRS) and set(summary["en-zh"]) == set(PROJECTIONS)
        fractions = [subs[f"{layer}.up.en-zh"]["overlap_cols"]["fraction"] for layer in (0, 1)]
        assert summary["en-zh"]["up"]["cols"] == pytest.approx(sum(fractions) / 2)
    ranked, excluded = (run[r].meta["overlap_with_general"] for r in ("ranked", "exclude-general"))
    assert all(ranked[p]["up"]["cols"] > excluded[p]["up"]["cols"] for p in PAIRS)


def test_exclude_general_fill_shares_nothing_with_general_and_keeps_candidates_first(two_rules):
    run, classes = two_rules
    ranked, excluded = run["ranked"], run["exclude-general"]
    for (layer, proj), by_name in excluded.indices.items():
        t_layer = excluded.meta["layer_map"][str(layer)]
        assert all(  # the general init does not depend on the rule
            torch.equal(x, y)
            for x, y in zip(by_name["general"], ranked.indices[(layer, proj)]["general"], strict=True)
        )
        for i, pair in enumerate(PAIRS):
            record = excluded.meta["submatrices"][f"{layer}.{proj}.{pair}"]
            for k, (side, axis) in enumerate((("out", "rows"), ("in", "cols"))):
                cls = classes[f"class.{t_layer}.{proj}.{side}"]
                chosen, general = by_name[pair][k], by_name["general"][k]
                own = cls[chosen] == i
                ranked_own = cls[ranked.indices[(layer, proj)][pair][k]] == i
                assert int(own.sum()) == int(ranked_own.sum())  # exclusion never costs a candidate
                if not is_head_side(proj, side):  # teacher >= 2 x student here: enough others
                    assert int(own.sum()) == min(chosen.numel(), int((cls == i).sum()))  # candidates first
                    assert not torch.isin(chosen[~own], general).any()
                    assert record[f"fill_rule_{axis}"] == "exclude-general"
                    assert record[f"overlap_{axis}"]["in_fill"] == 0


def test_factors_and_records_survive_save_and_load(two_rules, tmp_path):
    from mlas_lora.transfer.transfer import save_factors

    factors = two_rules[0]["exclude-general"]
    save_factors(factors, tmp_path)
    assert load_factors(tmp_path).meta == factors.meta


# ---------------------------------------------------------------- config, stage key, report


def test_fill_rule_is_validated():
    assert LoraSettings().fill_rule == "ranked" and LoraSettings().problems() == []
    problems = LoraSettings(fill_rule="avoid").problems()
    assert problems == ["lora.fill_rule: 'avoid' (known: ranked, exclude-general)"]


def test_transfer_stage_key_follows_the_fill_rule(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    classes_dir = run_dir / "classes"
    _write_inputs(classes_dir, describe(tiny_model("qwen2", "teacher")), [1, 3])
    (classes_dir / "stage.json").write_text(json.dumps({"key": "classes-key"}))
    monkeypatch.setattr(stages, "awareness_stage", lambda *args: (classes_dir, classes_dir))
    config = ExperimentConfig()
    config.models = replace(
        config.models,
        teacher=str(save_tiny(tmp_path / "teacher", "qwen2", "teacher")),
        student=str(save_tiny(tmp_path / "student", "qwen2", "student")),
    )
    config.lora = replace(config.lora, r_gen=4, r_spe=2, targets=["q", "up"])
    splits = SimpleNamespace(dev=dict.fromkeys(PAIRS[:2], []))
    keys = {}
    for rule in ("ranked", "exclude-general"):
        config.lora = replace(config.lora, fill_rule=rule)
        factors, folder = stages.transfer_stage(config, splits, run_dir)
        assert factors.meta["fill_rule"] == rule
        marker = folder / "stage.json"
        keys[rule] = json.loads(marker.read_text())["key"]
        assert folder.name == f"transfer-{keys[rule][:8]}"
        stamp = marker.stat().st_mtime_ns
        stages.transfer_stage(config, splits, run_dir)  # unchanged: skipped
        assert marker.stat().st_mtime_ns == stamp
    assert keys["ranked"] != keys["exclude-general"]
    assert all((run_dir / f"transfer-{key[:8]}").is_dir() for key in keys.values())  # side by side


def test_report_shows_mean_overlap_per_pair(two_rules, tmp_path):
    meta = json.loads(json.dumps(two_rules[0]["exclude-general"].meta))
    (tmp_path / "classes").mkdir()
    summary = {"total": {"general": 10, "specific": dict.fromkeys(PAIRS, 3)}}
    classes = {"lambda": 0.5, "pairs": PAIRS, "summary": summary}
    (tmp_path / "classes" / "classes.json").write_text(json.dumps(classes))
    (tmp_path / "transfer").mkdir()
    (tmp_path / "transfer" / "transfer.json").write_text(json.dumps(meta))
    folders = {name: tmp_path / name for name in ("awareness", "classes", "transfer")}
    text = method_diagnostics(folders)
    assert "fill rule `exclude-general`" in text and "| pair | rows | cols |" in text
    by_proj = meta["overlap_with_general"]["de-en"]
    rows = sum(v["rows"] for v in by_proj.values()) / len(by_proj)
    cols = sum(v["cols"] for v in by_proj.values()) / len(by_proj)
    assert f"| de-en | {rows:.1%} | {cols:.1%} |" in text
    del meta["overlap_with_general"]  # a transfer.json from before overlaps were recorded
    (tmp_path / "transfer" / "transfer.json").write_text(json.dumps(meta))
    assert "| pair |" not in method_diagnostics(folders)
