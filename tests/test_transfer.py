"""Transfer stage: Eq. (4)-(5) extraction, the head rule, Eq. (7)-(8) SVD factors, file round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mlas_lora.adapters.routed_lora import attach_routed_lora, init_from_factors
from mlas_lora.awareness.classify import classify_neurons, save_classes
from mlas_lora.awareness.scoring import save_awareness, score_teacher
from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTIONS, ArchInfo, decoder_layers, describe, projection
from mlas_lora.testing.tiny import save_tiny, tiny_model, tiny_tokenizer
from mlas_lora.transfer.extract import (
    HeadLayout,
    extract_submatrix,
    general_ranking,
    rank_indices,
    select_head_rows,
    select_side,
    specific_ranking,
)
from mlas_lora.transfer.svd_init import energy_kept, svd_factors
from mlas_lora.transfer.transfer import load_factors, run_transfer, transfer_factors

PAIRS = ["en-de", "en-zh", "de-en"]
QWEN_15B = ArchInfo("qwen2", 28, 1536, 8960, 12, 2, 128)
QWEN_05B = ArchInfo("qwen2", 24, 896, 4864, 14, 2, 64)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- Eq. (4)-(5): ranking by hand


def test_rank_indices_by_hand():
    scores = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.8])
    mask = torch.tensor([True, False, True, True, False, False])
    idx, filled = rank_indices(scores, mask, 2)
    assert idx.tolist() == [0, 3] and filled == 0  # best candidates 3 (0.7), 0 (0.5); sorted
    idx, filled = rank_indices(scores, mask, 4)
    assert idx.tolist() == [0, 1, 2, 3] and filled == 1  # 3 candidates + best outsider 1 (0.9)
    idx, filled = rank_indices(scores, mask, 5)
    assert idx.tolist() == [0, 1, 2, 3, 5] and filled == 2
    idx, filled = rank_indices(torch.ones(5), torch.zeros(5, dtype=torch.bool), 3)
    assert idx.tolist() == [0, 1, 2] and filled == 3  # ties go to the lower index


def test_rank_indices_rejects_bad_input():
    with pytest.raises(MlasLoraError, match="cannot choose 4"):
        rank_indices(torch.ones(3), torch.ones(3, dtype=torch.bool), 4)
    with pytest.raises(MlasLoraError, match="NaN"):
        rank_indices(torch.tensor([1.0, float("nan")]), torch.ones(2, dtype=torch.bool), 1)


def test_general_and_specific_selection_with_aggregate_score():
    info_t = ArchInfo("llama", 1, 6, 4, 2, 2, 3)  # gate: 4 x 6 teacher -> 2 x 3 student
    info_s = ArchInfo("llama", 1, 3, 2, 1, 1, 3)
    phi = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [3.0, 0.0, 1.0, 0.0, 9.0, 2.0]])
    classes = torch.tensor([-1, -1, 0, 1, 1, -1])
    scores, mask = general_ranking(phi, classes)  # mean: [2, 1, 2, 2, 7, 4], general {0, 1, 5}
    sel = select_side("gate", "in", scores, mask, info_t, info_s)
    assert (
        sel.indices.tolist() == [0, 1, 5] and sel.n_filled == 0 and sel.score == 7.0 and sel.rule == "plain"
    )
    scores, mask = specific_ranking(phi, classes, 1)  # pair 1: [3, 0, 1, 0, 9, 2], specific {3, 4}
    sel = select_side("gate", "in", scores, mask, info_t, info_s)
    assert sel.indices.tolist() == [0, 3, 4] and sel.n_filled == 1 and sel.score == 12.0
    with pytest.raises(MlasLoraError, match=r"expected awareness and classes of shape \(4,\)"):
        select_side("gate", "out", scores, mask, info_t, info_s)


def test_extract_submatrix_keeps_order_and_casts():
    weight = torch.arange(20, dtype=torch.bfloat16).reshape(4, 5)
    sub = extract_submatrix(weight, torch.tensor([1, 3]), torch.tensor([0, 2, 4]))
    assert sub.dtype == torch.float32
    assert sub.tolist() == [[5.0, 7.0, 9.0], [15.0, 17.0, 19.0]]


# ---------------------------------------------------------------- head rule


def test_head_rule_by_hand():
    teacher, student = HeadLayout(1, 2, 4), HeadLayout(1, 2, 2)  # pairs (0,2) (1,3) | (4,6) (5,7)
    scores = torch.tensor([5.0, 0, 5, 0, 1, 9, 1, 9])
    sel = select_head_rows(scores, torch.ones(8, dtype=torch.bool), teacher, student)
    assert sel.indices.tolist() == [0, 2, 5, 7] and sel.score == 28.0 and sel.n_filled == 0
    mask = torch.tensor([False, True, False, True, False, False, False, False])  # only pair (1, 3)
    sel = select_head_rows(scores, mask, teacher, student)
    assert sel.indices.tolist() == [1, 3, 5, 7] and sel.n_filled == 2 and sel.score == 18.0


def test_head_rule_lays_slot_out_as_student_rotary_pairs():
    teacher, student = HeadLayout(1, 1, 8), HeadLayout(1, 1, 4)  # 4 teacher pairs -> 2 per slot
    scores = torch.tensor([0.0, 3, 1, 2, 0, 3, 1, 2])  # pair sums: j0 0, j1 6, j2 2, j3 4
    sel = select_head_rows(scores, torch.ones(8, dtype=torch.bool), teacher, student)
    assert sel.indices.tolist() == [1, 3, 5, 7]


def test_head_rule_keeps_groups_even_when_one_group_scores_higher():
    teacher, student = HeadLayout(2, 2, 4), HeadLayout(2, 1, 4)
    scores = torch.cat([torch.zeros(8), torch.full((8,), 10.0)])
    sel = select_head_rows(scores, torch.ones(16, dtype=torch.bool), teacher, student)
    assert sel.indices.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # group 0 gives its head despite lower scores


def _assert_head_structure(rows, t_heads_per_group, t_dim, s_heads_per_group, s_dim):
    assert len(set(rows)) == len(rows)
    t_half, s_half = t_dim // 2, s_dim // 2
    for h in range(len(rows) // s_dim):
        head = rows[h * s_dim : (h + 1) * s_dim]
        teacher_heads = {r // t_dim for r in head}
        assert len(teacher_heads) == 1  # one teacher head per student head
        assert teacher_heads.pop() // t_heads_per_group == h // s_heads_per_group  # same kv group
        assert head[:s_half] == sorted(head[:s_half])
        assert [r + t_half for r in head[:s_half]] == head[s_half:]  # student pair (i, i+d/2) = teacher pair


@pytest.mark.parametrize("proj,side", [("q", "out"), ("k", "out"), ("v", "out"), ("o", "in")])
def test_head_rule_on_qwen25_15b_to_05b(proj, side):
    n = QWEN_15B.projection_shape(proj)[0 if side == "out" else 1]
    gen = torch.Generator().manual_seed(1)
    scores, mask = torch.rand(n, generator=gen), torch.rand(n, generator=gen) < 0.4
    sel = select_side(proj, side, scores, mask, QWEN_15B, QWEN_05B)
    assert sel.rule == "gqa-rotary"
    assert sel.indices.numel() == QWEN_05B.projection_shape(proj)[0 if side == "out" else 1]
    per_group = (6, 7) if proj in ("q", "o") else (1, 1)
    _assert_head_structure(sel.indices.tolist(), per_group[0], 128, per_group[1], 64)
    assert sel.n_filled == int((~mask[sel.indices]).sum())


def test_head_rule_falls_back_when_kv_groups_differ():
    student = ArchInfo("qwen2", 2, 32, 64, 4, 1, 8)
    sel = select_side(
        "k", "out", torch.rand(32), torch.ones(32, dtype=torch.bool), describe(_tiny("qwen2")), student
    )
    assert sel.rule == "plain (kv groups differ: teacher 2, student 1)" and sel.indices.numel() == 8


# ---------------------------------------------------------------- Eq. (7)-(8): SVD factors


def test_svd_factors_are_the_best_rank_r_approximation():
    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    b, a, energy = svd_factors(w, 3)
    assert b.shape == (12, 3) and a.shape == (3, 7) and b.dtype == a.dtype == torch.float32
    torch.testing.assert_close(b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    assert energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()))
    b, a, energy = svd_factors(w, 7)
    torch.testing.assert_close(b @ a, w, rtol=1e-5, atol=1e-5)
    assert energy == pytest.approx(1.0)
    assert energy_kept(torch.zeros(3), 1) == 1.0
    with pytest.raises(MlasLoraError, match="between 1 and min"):
        svd_factors(w, 8)


# ---------------------------------------------------------------- driver and files


def _tiny(family, role="teacher"):
    return tiny_model(family, role)


def _write_inputs(tmp_path, teacher: ArchInfo, selected, seed=0):
    """Synthetic awareness + classes files for every teacher layer and projection."""
    gen = torch.Generator().manual_seed(seed)
    phi, classes = {"relevance": torch.rand(len(PAIRS), teacher.num_layers, generator=gen)}, {}
    for layer in range(teacher.num_layers):
        for proj in PROJECTIONS:
            for side, n in zip(("out", "in"), teacher.projection_shape(proj), strict=True):
                phi[f"phi.{layer}.{proj}.{side}"] = torch.rand(len(PAIRS), n, generator=gen)
                classes[f"class.{layer}.{proj}.{side}"] = torch.randint(-1, len(PAIRS), (n,), generator=gen)
    save_file(phi, str(tmp_path / "awareness.safetensors"))
    save_file(classes, str(tmp_path / "classes.safetensors"))
    (tmp_path / "awareness.json").write_text(json.dumps({"pairs": PAIRS, "selected_layers": selected}))
    (tmp_path / "classes.json").write_text(json.dumps({"lambda": 0.5, "pairs": PAIRS}))
    return phi, classes


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_transfer_shapes_and_reconstruction(tmp_path, family):
    teacher, student = _tiny(family), _tiny(family, "student")
    t_info, s_info = describe(teacher), describe(student)
    _, classes = _write_inputs(tmp_path, t_info, [1, 3])
    factors = transfer_factors(teacher, student, tmp_path, tmp_path, ["en-zh"], 16, 4, progress=False)
    assert sorted(factors.keys()) == sorted((layer, p) for layer in (0, 1) for p in PROJECTIONS)
    for (layer, proj), inits in factors.tensors.items():
        assert list(inits) == ["general", "en-zh"]
        t_layer = [1, 3][layer]
        weight = projection(decoder_layers(teacher)[t_layer], proj).weight.detach()
        m, n = s_info.projection_shape(proj)
        for name, (b, a) in inits.items():
            r = 16 if name == "general" else 4
            assert b.shape == (m, r) and a.shape == (r, n)
            rows, cols = factors.indices[(layer, proj)][name]
            sub = weight[rows][:, cols]
            u, s, vh = torch.linalg.svd(sub, full_matrices=False)
            torch.testing.assert_close(b @ a, (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-4, atol=1e-5)
            record = factors.meta["submatrices"][f"{layer}.{proj}.{name}"]
            assert record["teacher_layer"] == t_layer and record["shape"] == [m, n]
            cls = classes[f"class.{t_layer}.{proj}.out"][rows]
            assert record["filled_rows"] == int((cls != (-1 if name == "general" else 1)).sum())
            if proj in ("k", "v") and name == "general":  # 16 x 32 at rank 16: exact
                torch.testing.assert_close(b @ a, sub, rtol=1e-4, atol=1e-5)
                assert record["energy_kept"] == pytest.approx(1.0)
        assert factors.meta["submatrices"][f"{layer}.q.general"]["head_rule_rows"] == "gqa-rotary"
        assert factors.meta["submatrices"][f"{layer}.o.general"]["head_rule_cols"] == "gqa-rotary"
    assert factors.meta["layer_map"] == {"0": 1, "1": 3}


def test_checkpoint_teacher_round_trip_and_errors(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    teacher_dir = save_tiny(tmp_path / "teacher", "qwen2", "teacher")
    _write_inputs(inputs, describe(_tiny("qwen2")), [0, 2])
    targets = ["q", "down"]
    from_model = run_transfer(
        _tiny("qwen2"), _tiny("qwen2", "student"), inputs, inputs, out, None, 4, 2, targets, progress=False
    )
    loaded = load_factors(out)
    assert loaded.meta == json.loads((out / "transfer.json").read_text()) == from_model.meta
    for key, inits in from_model.tensors.items():
        assert list(loaded[key]) == ["general", *PAIRS]
        for name, (b, a) in inits.items():
            assert torch.equal(loaded[key][name][0], b) and torch.equal(loaded[key][name][1], a)
            assert all(
                torch.equal(x, y)
                for x, y in zip(loaded.indices[key][name], from_model.indices[key][name], strict=True)
            )
    student_dir = save_tiny(tmp_path / "student", "qwen2", "student")
    from_dir = transfer_factors(teacher_dir, student_dir, inputs, inputs, None, 4, 2, targets, False)
    for key, inits in from_model.tensors.items():
        for name, (b, a) in inits.items():
            assert torch.equal(from_dir[key][name][0], b) and torch.equal(from_dir[key][name][1], a)


def test_transfer_reports_every_problem(tmp_path):
    teacher, student = _tiny("llama"), _tiny("llama", "student")
    _write_inputs(tmp_path, describe(teacher), [2, 1, 0])
    with pytest.raises(MlasLoraError) as err:
        transfer_factors(teacher, student, tmp_path, tmp_path, ["en-fr"], 4, 17, ["k", "lm_head"], False)
    message = str(err.value)
    for part in (
        "unknown pair 'en-fr'",
        "unknown target 'lm_head'",
        "selects 3 teacher layers",
        "must be distinct",
        "rank 17 (r_spe) not in [1, 16] for k",
    ):
        assert part in message
    (tmp_path / "awareness.json").write_text(json.dumps({"pairs": PAIRS, "selected_layers": [0, 1]}))
    save_file({"phi.0.q.in": torch.zeros(3, 64)}, str(tmp_path / "awareness.safetensors"))
    with pytest.raises(MlasLoraError, match="has no tensor 'phi.0.q.out'"):
        transfer_factors(teacher, student, tmp_path, tmp_path, None, 4, 2, ["q"], False)


def test_awareness_files_to_routed_student_end_to_end(tmp_path):
    """Real awareness-stage files in, factors straight into the adapters' init_from_factors."""
    seeds = {
        "en-de": [
            Example("en", "de", "The cat sleeps.", "Die Katze schläft."),
            Example("en", "de", "Hi", "Hallo"),
        ],
        "en-zh": [Example("en", "zh", "It rains.", "下雨了。")],
    }
    teacher = _tiny("qwen2")
    scores = score_teacher(
        teacher, tiny_tokenizer(), seeds, dtype=torch.float32, num_student_layers=2, progress=False
    )
    save_awareness(scores, tmp_path)
    save_classes(classify_neurons(scores, 0.2), tmp_path)
    factors = run_transfer(
        teacher, _tiny("qwen2", "student"), tmp_path, tmp_path, tmp_path, None, 8, 4, progress=False
    )
    assert factors.meta["layer_map"] == {str(i): t for i, t in enumerate(scores.selected_layers)}
    routed = attach_routed_lora(_tiny("qwen2", "student"), ["en-de", "en-zh"], r_gen=8, r_spe=4)
    init_from_factors(routed, load_factors(tmp_path), mode="add")
    layer = routed.routed_layers()[(1, "o")]
    b, a = factors[(1, "o")]["en-zh"]
    torch.testing.assert_close(
        layer.scaling_spe * layer.specific["en-zh"].B @ layer.specific["en-zh"].A, b @ a
    )
