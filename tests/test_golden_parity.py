"""Numerical parity with the official DeepGen 1.0 implementation (issue 9): the golden vectors.

The golden set is what the official code computed at a tiny random size. Set A is vendored verbatim in
``tests/data/golden/deepgen_tiny_a`` (data only, see ``tests/data/golden/README.md``), so every clone runs these
tests; ``$DEEPGEN_GOLDEN_DIR`` points them at another set laid out the same way. A missing set is a failure,
never a skip. Its weights are imported through our official-weights import (original checkpoint layout + the
tiny Qwen2.5-VL folder) in official parity mode, and every recorded tensor must be reproduced through the public
API: integers / bools exactly, floats with ``allclose(rtol=1e-4, atol=1e-4)`` (the set's README rule). The
comparisons live in ``deepgen_components.cli.fidelity`` (also run by ``benchmarks/fidelity.py``); this file asserts
on them.
"""

import inspect
import os
from pathlib import Path

import pytest
import torch

from deepgen_components import DeepGenPipeline
from deepgen_components.cli import fidelity

VENDORED_DIR = Path(__file__).resolve().parent / "data" / "golden" / "deepgen_tiny_a"
GOLDEN_DIR = Path(os.environ.get("DEEPGEN_GOLDEN_DIR") or VENDORED_DIR)
# Another set (via $DEEPGEN_GOLDEN_DIR) may lack some sections; the vendored set A must have them all.
VENDORED = GOLDEN_DIR.resolve() == VENDORED_DIR.resolve()

SECTIONS = ["t2i", "edit", "dit_t2i", "dit_edit", "gen_t2i", "gen_edit", "train_t2i", "train_edit"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors are tiny: intra-op threads only add overhead, and on a busy machine (tests run in
    parallel) OpenMP oversubscription makes this module 20-40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden() -> fidelity.GoldenSet:
    # No skip: without the set, load_golden raises FileNotFoundError naming the folder and every test errors.
    return fidelity.load_golden(GOLDEN_DIR)


@pytest.fixture(scope="module")
def model(golden):
    return fidelity.load_official_model(golden)


@pytest.fixture(scope="module")
def rows(golden, model) -> list[fidelity.Row]:
    return fidelity.compare_golden(golden, model)


def _failures(rows) -> str:
    return "\n" + fidelity.format_table([r for r in rows if not r.passed])


def test_vendored_golden_files_match_the_manifest(golden):
    """Every file the manifest lists is there with its recorded size: a truncated copy, a missing file or a
    Git LFS pointer fails here instead of as a confusing numerical mismatch."""
    files = golden.manifest["files"]
    assert files
    sizes = {name: (GOLDEN_DIR / name).stat().st_size if (GOLDEN_DIR / name).is_file() else None for name in files}
    assert sizes == files


def test_official_checkpoint_imports_completely(model):
    report = model.import_report
    assert report.loaded and not report.missing and not report.unexpected, report.summary()
    assert model.bridge.config.mask_padding is False and model.bridge.config.tokens == "all"  # parity mode


def test_every_golden_tensor_is_compared(golden, rows):
    compared = {r.name for r in rows if r.check != "not compared"}
    assert set(golden.tensors) <= compared, sorted(set(golden.tensors) - compared)


@pytest.mark.parametrize("section", SECTIONS)
def test_section_reproduces_the_official_tensors(rows, section):
    section_rows = [r for r in rows if r.name.startswith(section + ".")]
    if not section_rows and not VENDORED:
        pytest.skip(f"the golden set at {GOLDEN_DIR} has no {section}.* tensors")
    assert section_rows, f"the vendored golden set has no {section}.* tensors"
    assert all(r.passed for r in section_rows), _failures(section_rows)


def test_layer_selection_follows_the_official_rule(golden, rows):
    (row,) = [r for r in rows if r.name == "selected_layers (manifest)"]
    assert row.passed, row.note


def test_integer_tensors_are_exact(golden, rows):
    exact = [r for r in rows if r.check == "exact"]
    integer_names = {n for n, t in golden.tensors.items() if not t.is_floating_point()}
    assert integer_names <= {r.name for r in exact}
    assert all(r.passed and r.max_abs == 0 for r in exact), _failures(exact)


def test_float_tensors_use_the_readme_tolerance(rows):
    floats = [r for r in rows if r.check == "allclose"]
    assert floats and all(r.tolerance == "rtol=0.0001 atol=0.0001" for r in floats)
    assert max(r.tol_used for r in floats) <= 1.0, _failures(floats)


def test_recorded_posterior_samples_are_draws_of_our_vae_posterior(golden, rows):
    samples = [r for r in rows if r.check == "sample"]
    expected = {n for n in golden.tensors if ".ref_latents." in n or n.startswith("train_edit.x0.")}
    assert {r.name for r in samples} == expected
    assert all(r.passed for r in samples), _failures(samples)


def test_pipeline_reproduces_text_to_image_end_to_end(rows):
    pipeline_rows = [r for r in rows if r.name.startswith("gen_t2i.") and r.via.startswith("DeepGenPipeline")]
    names = {r.name for r in pipeline_rows}
    assert {"gen_t2i.final_latents", "gen_t2i.pixels"} <= names
    assert all(r.passed for r in pipeline_rows), _failures(pipeline_rows)


def test_pipeline_reproduces_editing_with_recorded_reference_latents(rows):
    # reference_latents lets the pipeline take the official posterior sample edit.ref_latents.* as recorded.
    assert "reference_latents" in inspect.signature(DeepGenPipeline.__call__).parameters
    pipeline_rows = [
        r for r in rows if r.name.startswith("gen_edit.") and r.via.startswith("DeepGenPipeline")
    ]
    assert {"gen_edit.final_latents", "gen_edit.pixels"} <= {r.name for r in pipeline_rows}
    assert all(r.passed for r in pipeline_rows), _failures(pipeline_rows)


def test_loss_check_leaves_condition_dropout_unchanged(golden, model, rows):
    assert model.config.condition_dropout == golden.manifest["model_kwargs"]["unconditional"]


def test_comparison_detects_a_perturbed_tensor(golden, model):
    """The check is not vacuous: one changed position id and a 3e-4 error in one context value both fail."""
    position_ids = golden["t2i.position_ids"].clone()
    position_ids[0, 0, -1] += 1
    context = golden["t2i.context"].clone()
    context[0, 0, 0] += 3e-4 + 1e-4 * context[0, 0, 0].abs()
    pooled = golden["t2i.pooled"]
    bad = fidelity.GoldenSet(
        golden.path,
        golden.manifest,
        {"t2i.position_ids": position_ids, "t2i.context": context, "t2i.pooled": pooled},
    )
    rows = {r.name: r for r in fidelity.compare_golden(bad, model)}
    assert not rows["t2i.position_ids"].passed and rows["t2i.position_ids"].max_abs == 1
    assert not rows["t2i.context"].passed and rows["t2i.context"].tol_used > 1
    assert rows["t2i.pooled"].passed


def _attention(model) -> tuple[str, str, str]:
    config = model.vlm.config
    return (
        config._attn_implementation,
        config.text_config._attn_implementation,
        config.vision_config._attn_implementation,
    )


def test_the_imported_vlm_runs_sdpa_attention_as_the_golden_set_did(golden, model):
    """The pin: ``deepgen_from_official`` loads the VLM with SDPA, the attention the golden set was made with.
    SDPA gives a left-pad query row (all its keys masked) a zero attention output, as flash-attention varlen in
    the official bf16 run does; eager attention does not (next test)."""
    assert golden.manifest["attention_implementation"]["qwen2_5_vl_text"] == "sdpa"
    assert _attention(model) == ("sdpa", "sdpa", "sdpa")


def test_eager_vlm_attention_changes_the_left_pad_rows_and_breaks_parity(golden, model):
    """Why the pin matters: the same weights with eager attention keep every real token's hidden state (within
    the tolerance) but change the left-pad rows completely, and through the unmasked connector and pooled mean
    every padded prompt's context, pooled vector, generated image and training loss."""
    texts = list(golden.prompts["t2i"]) + list(golden.prompts["t2i_cfg_prompts"])
    before = _attention(model)
    model.vlm.set_attn_implementation("eager")
    try:
        assert _attention(model)[1] == "eager"
        with torch.no_grad():
            batch = model.prepare_prompts(texts)
            _, hidden = model.encode_tokens(batch)
        eager_rows = fidelity.compare_golden(golden, model)
    finally:
        model.vlm.set_attn_implementation(before[1])  # the shared model goes back to what it was loaded with
    assert _attention(model) == before

    diff = (torch.stack(hidden.hidden_states) - golden["t2i.selected_hidden_states"]).abs().amax(dim=(0, 3))
    pads = torch.zeros_like(diff, dtype=torch.bool)
    pads[:, : batch.attention_mask.shape[1]] = ~batch.attention_mask.bool()
    assert pads.any()
    assert diff[pads].min() > 1.0, "eager attention should change every left-pad hidden state"
    assert diff[~pads].max() < fidelity.ATOL, "eager attention should keep the real tokens' hidden states"

    failed = {r.name for r in eager_rows if not r.passed}
    assert {
        "t2i.selected_hidden_states", "t2i.context", "t2i.pooled", "edit.context", "edit.pooled",
        "gen_t2i.pixels", "gen_edit.pixels", "train_t2i.loss",
    } <= failed
    # What does not go through the VLM's padded rows still matches: the unpadded edit training batch, the
    # direct DiT calls on the golden condition, token ids and positions.
    passed = {r.name for r in eager_rows if r.passed}
    assert {"train_edit.context", "train_edit.loss", "dit_t2i.velocity", "t2i.input_ids", "t2i.position_ids"} <= passed


def test_mask_padding_differs_from_golden_only_through_the_pads(golden, model):
    """``mask_padding=True`` (our default for new training) keeps pads out of the connector, the pooled mean
    and the DiT. The VLM is unchanged; a row without pads still matches the golden set; a padded row differs
    from it at its real positions, and equals that prompt encoded alone (no pads) in parity mode."""
    masked = fidelity.load_official_model(golden, mask_padding=True)
    texts = list(golden.prompts["t2i"]) + list(golden.prompts["t2i_cfg_prompts"])
    with torch.no_grad():
        batch = masked.prepare_prompts(texts)
        condition, hidden = masked.encode_tokens(batch)
        unpadded = [model.encode_condition([text]) for text in texts]
    tol = dict(rtol=fidelity.RTOL, atol=fidelity.ATOL)
    assert torch.allclose(torch.stack(hidden.hidden_states), golden["t2i.selected_hidden_states"], **tol)
    padded = ~batch.attention_mask.bool().all(1)
    assert padded.any() and not padded.all(), "set needs padded and unpadded t2i rows"
    for row, text in enumerate(texts):
        real = condition.mask[row]
        ours, theirs = condition.context[row, real], golden["t2i.context"][row, real]
        if not padded[row]:
            assert torch.allclose(ours, theirs, **tol) and torch.allclose(
                condition.pooled[row], golden["t2i.pooled"][row], **tol
            ), text
            continue
        assert not torch.allclose(ours, theirs, **tol), f"{text!r}: pads should change the golden context"
        assert torch.allclose(ours, unpadded[row].context[0], **tol), text
        assert torch.allclose(condition.pooled[row], unpadded[row].pooled[0], **tol), text


def test_format_table_lists_every_row(rows):
    table = fidelity.format_table(rows)
    assert len(table.splitlines()) == len(rows) + 2
    assert "**NO**" not in table
