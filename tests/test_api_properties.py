"""Property: whatever a caller passes for the prompt, size, steps, guidance, images per prompt, seed / generator and
reference image, ``DeepGenPipeline.__call__`` either returns the images it promised or raises ValueError / TypeError
/ FileNotFoundError with a message, raised by our own checks, never an error from deep inside torch."""

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepgen_components import DeepGenPipeline, deepgen_tiny
from deepgen_components.processing import load_image

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)

def mostly(valid, invalid):
    """Valid five times in six, so that about a quarter of the calls have every argument valid and run the model."""
    return st.integers(0, 5).flatmap(lambda k: invalid if k == 0 else valid)


# Valid values are kept small (<= 64 px, 1-2 steps) so that a valid call costs a fraction of a second.
words = st.text(min_size=1, max_size=12).filter(str.strip)
prompts = mostly(
    st.one_of(words, st.lists(words, min_size=1, max_size=2)),
    st.one_of(st.text(max_size=3).filter(lambda t: not t.strip()), st.sampled_from([[], [""], None, 3, b"a", [None]])),
)
sides = mostly(st.sampled_from([None, 32, 64]), st.one_of(st.integers(-64, 96), st.sampled_from([2048, 64.0, "64", True])))
steps = mostly(st.sampled_from([1, 2]), st.one_of(st.integers(-2, 0), st.sampled_from([1.5, "2", None, True, 2.0])))
guidance = mostly(
    st.one_of(st.none(), st.floats(0, 12)),
    st.one_of(st.floats(max_value=-1e-9), st.sampled_from([float("nan"), math.inf, -math.inf, "4", True])),
)
images_per_prompt = mostly(st.sampled_from([1, 2]), st.sampled_from([0, -1, 1.0, "1", None]))
generators = mostly(
    st.one_of(st.none(), st.integers(0, 2**64 - 1).map(lambda seed: torch.Generator().manual_seed(seed))),
    st.one_of(st.integers(), st.just("seed")),  # a seed where a generator belongs: a TypeError saying how to make one
)
references = mostly(
    st.one_of(
        st.none(),
        st.sampled_from([(16, 16), (40, 100), (64, 48), (1, 1)]).map(lambda size: Image.new("RGB", size, (200, 30, 30))),
    ),
    st.sampled_from(["missing.png", 7, torch.zeros(2, 8, 8), [None, None, None], Image.new("RGB", (0, 0))]),
)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipeline = DeepGenPipeline(deepgen_tiny())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def raised_by_our_code(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in deepgen_components (a deliberate check)."""
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "").startswith("deepgen_components")


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, height=sides, width=sides, num_inference_steps=steps, guidance_scale=guidance,
       num_images_per_prompt=images_per_prompt, generator=generators, image=references)
def test_a_call_returns_images_or_raises_a_named_user_error(
    pipe, prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, generator, image
):
    try:
        out = pipe(prompt, image=image, height=height, width=width, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator)
    except USER_ERRORS as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        assert raised_by_our_code(err), f"{type(err).__name__} from inside a library: {err}"
        event(f"raised {type(err).__name__}")
        return
    event("returned images")
    batch = 1 if isinstance(prompt, str) else len(prompt)
    assert len(out.images) == batch * num_images_per_prompt
    if height is not None and width is not None:
        assert all(im.size == (width, height) for im in out.images)
    assert all(im.mode == "RGB" for im in out.images)


@settings(max_examples=20, deadline=None, database=None)
@given(content=st.binary(max_size=64), suffix=st.sampled_from([".png", ".jpg", ".txt", ""]))
def test_load_image_reads_images_or_names_the_file(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("img") / f"file{suffix}"
    path.write_bytes(content)
    try:
        image = load_image(path)
    except ValueError as err:
        assert str(path) in str(err) and "not a readable image" in str(err)
        return
    assert image.width >= 1 and image.height >= 1  # bytes that happen to form an image


def test_load_image_names_a_missing_file_and_reads_a_real_png(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    Image.new("RGBA", (5, 7), (1, 2, 3, 4)).save(tmp_path / "real.png")
    image = load_image(tmp_path / "real.png")
    assert image.size == (5, 7) and image.mode == "RGBA" and image.getpixel((0, 0)) == (1, 2, 3, 4)
