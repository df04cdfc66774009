"""DeepGen's input conventions in plain Python + numpy (no torch), shared by the PyTorch pipeline and the
torch-free ONNX Runtime / TensorRT runtime so that both follow one implementation:

* the official chat templates (no system turn; ``Generate an image: {prompt}`` for text-to-image; one vision
  block per reference, then ``\\n{instruction}`` for editing);
* left padding and the official truncation of long prompts (keep the last tokens);
* the Qwen2/2.5-VL multi-axis rope positions (M-RoPE) over real tokens, left pads at a fixed position;
* the resize rules (``fix_pixels`` for training, long side <= target for inference references), the reference
  normalisation of a pipeline's ``image`` argument, image <-> [-1, 1] arrays, and the official uint8 conversion;
* the vision tower's patch layout (sizes, the order patches are cut in);
* the sampling loop's rules: diffusers' FlowMatch Euler grid, classifier-free guidance, the Euler update and the
  DiT batch order under CFG. ``guidance`` and ``euler_update`` are plain arithmetic and take numpy arrays or
  torch tensors alike; ``tests/test_runtime_mirror.py`` pins the torch-free loop to the PyTorch one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_PAD",
    "OFFICIAL_PAD_POSITION",
    "T2I_WRAPPER",
    "USER_TURN",
    "VISION_BLOCK",
    "VISION_RESIZE_FACTOR",
    "cfg_order",
    "edit_prompt",
    "euler_update",
    "fix_pixels_size",
    "flow_match_grid",
    "guidance",
    "left_pad",
    "limit_long_side_size",
    "log_reference_resize",
    "mrope_positions",
    "nearest_multiples",
    "output_size",
    "patch_layout",
    "pil_to_array",
    "pixels_to_uint8_array",
    "prompts_with_references",
    "reference_pixels",
    "references_per_prompt",
    "t2i_prompt",
    "truncate_official",
]

logger = logging.getLogger(__name__)

USER_TURN = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
T2I_WRAPPER = "Generate an image: {prompt}"
VISION_BLOCK = "<|vision_start|>{pads}<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
# The Qwen2.5-VL image processor's normalisation (CLIP's mean / std), applied to [0, 1] pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# DeepGen's first VLM preprocessing step: a bilinear resize by 28/32 (a 512 px reference becomes 448 px).
VISION_RESIZE_FACTOR = 28 / 32

# Official DeepGen fills left-pad positions with 1 (transformers 4.x ``get_rope_index``). Pad positions never
# influence real tokens: a pad query row sees no key and pad keys are masked for every real query.
OFFICIAL_PAD_POSITION = 1


# -- templates --------------------------------------------------------------------------------------------------


def t2i_prompt(prompt: str) -> str:
    """The official text-to-image chat text."""
    return USER_TURN.format(content=T2I_WRAPPER.format(prompt=prompt))


def edit_prompt(instruction: str, image_token_counts: Sequence[int]) -> str:
    """The official editing chat text: one vision block per reference, then the instruction (no wrapper)."""
    blocks = "".join(VISION_BLOCK.format(pads=IMAGE_PAD * n) for n in image_token_counts)
    return USER_TURN.format(content=f"{blocks}\n{instruction}")


# -- token sequences ---------------------------------------------------------------------------------------------

_warned_truncation = False


def truncate_official(
    encoded: list[list[int]], image_tokens: Sequence[int], image_token_id: int, max_length: int | None
) -> list[list[int]]:
    """Prompts longer than ``max_length`` text tokens (plus their image tokens) keep their last tokens, as the
    official code does, with a warning; a cut into the reference images is an error."""
    global _warned_truncation
    if max_length is None:
        return encoded
    out = []
    for i, ids in enumerate(encoded):
        limit = max_length + image_tokens[i]
        if len(ids) > limit:
            kept = ids[-limit:]
            if sum(1 for tok in kept if tok == image_token_id) != image_tokens[i]:
                raise ValueError(
                    f"prompts[{i}]: the instruction is too long ({len(ids)} tokens > {limit}); truncating it "
                    "the official way (keep the last tokens) would cut into the reference images"
                )
            if not _warned_truncation:
                logger.warning(
                    "prompt of %d tokens is longer than max_length=%d: keeping its last %d tokens (official "
                    "behaviour)", len(ids) - image_tokens[i], max_length, limit,
                )
                _warned_truncation = True
            ids = kept
        out.append(ids)
    return out


def left_pad(encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 (B, L), left-padded to the longest sequence."""
    length = max(len(ids) for ids in encoded)
    input_ids = np.full((len(encoded), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(encoded), length), dtype=np.int64)
    for i, ids in enumerate(encoded):
        if ids:
            input_ids[i, length - len(ids) :] = ids
            attention_mask[i, length - len(ids) :] = 1
    return input_ids, attention_mask


def mrope_positions(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    grids: Sequence[Sequence[int]],
    *,
    image_token_id: int,
    spatial_merge_size: int,
    pad_position: int = OFFICIAL_PAD_POSITION,
) -> np.ndarray:
    """Qwen2/2.5-VL multi-axis (temporal, row, col) rope positions, int64 (3, B, L).

    Text tokens get the same 1-D position on all three axes, counted over real tokens only. Each image (grid
    (t, h, w) in patches, ``t*h*w / merge**2`` consecutive image tokens) gets (start, start + row, start + col)
    and the text after it resumes at ``start + max(h, w) / merge``. Images are consumed from ``grids`` in order
    across the batch, as the Hugging Face implementation does. Left pads get ``pad_position``.
    """
    batch, length = input_ids.shape
    positions = np.full((3, batch, length), pad_position, dtype=np.int64)
    grids = [tuple(int(v) for v in g) for g in grids]
    next_grid = 0
    for b in range(batch):
        real = np.asarray(attention_mask[b]).astype(bool)
        ids = np.asarray(input_ids[b])[real].tolist()
        pieces: list[np.ndarray] = []
        current, i = 0, 0
        while i < len(ids):
            if ids[i] == image_token_id:
                if next_grid >= len(grids):
                    raise ValueError(
                        f"input_ids hold more image blocks than image_grid_thw describes ({len(grids)} grids)"
                    )
                t, h, w = grids[next_grid]
                next_grid += 1
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                count = t * gh * gw
                if ids[i : i + count] != [image_token_id] * count:
                    raise ValueError(
                        f"image {next_grid - 1} with grid (t={t}, h={h}, w={w}) needs {count} consecutive image "
                        f"tokens in sample {b}; the prompt has fewer"
                    )
                tt, hh, ww = np.meshgrid(np.zeros(t, np.int64), np.arange(gh), np.arange(gw), indexing="ij")
                pieces.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current)
                current += max(gh, gw)
                i += count
            else:
                j = i
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                pieces.append(np.broadcast_to(np.arange(current, current + j - i), (3, j - i)))
                current += j - i
                i = j
        if pieces:
            positions[:, b, real] = np.concatenate(pieces, axis=1)
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw describes {len(grids)} images but input_ids hold {next_grid} image blocks")
    return positions


# -- sizes and pixels --------------------------------------------------------------------------------------------


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def fix_pixels_size(height: int, width: int, target: int = 512, multiple: int = 32) -> tuple[int, int]:
    """Official ``fix_pixels``: scale so sqrt(H*W) = target, keep the aspect, round each side *up* to a
    multiple of 32."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = target / math.sqrt(height * width)
    return _round_up(height * scale, multiple), _round_up(width * scale, multiple)


def limit_long_side_size(height: int, width: int, target: int = 512, multiple: int = 32) -> tuple[int, int]:
    """The official inference rule for references: shrink so the long side is at most ``target`` (never
    enlarge), then round each side up to a multiple of 32."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = min(1.0, target / max(height, width))
    return _round_up(height * scale, multiple), _round_up(width * scale, multiple)


def nearest_multiples(value: int, multiple: int) -> str:
    """The valid sizes next to ``value`` (for error messages)."""
    if value <= multiple:  # below the smallest valid size there is only one neighbour
        return str(multiple)
    low = value // multiple * multiple
    return f"{low} or {low + multiple}" if low != value else str(value)


def pil_to_array(image, size: tuple[int, int] | None = None) -> np.ndarray:
    """PIL image (any mode) -> RGB float32 (3, H, W) in [-1, 1], optionally resized (bicubic) to (H, W)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"image: expected a PIL.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def pixels_to_uint8_array(pixels: np.ndarray) -> np.ndarray:
    """[-1, 1] pixels (B, 3, H, W) -> uint8 (B, H, W, 3) the official way: clamp(127.5 * x + 128), truncated."""
    return np.clip(pixels.astype(np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


# -- pipeline inputs ----------------------------------------------------------------------------------------------


def references_per_prompt(image, batch: int) -> list[list] | None:
    """Normalise a pipeline's ``image`` argument to one list of references per prompt.

    One prompt: an image, or a list of images (several references). Several prompts: a list with one entry per
    prompt, each None, an image or a list of images."""
    if image is None:
        return None
    if batch == 1 and not (isinstance(image, (list, tuple)) and len(image) == 1 and isinstance(image[0], (list, tuple))):
        return [list(image) if isinstance(image, (list, tuple)) else [image]]
    if not isinstance(image, (list, tuple)) or len(image) != batch:
        raise ValueError(f"image: with {batch} prompts give a list of {batch} entries (an image or a list of images each)")
    return [[] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry] for entry in image]


def log_reference_resize(image, size: tuple[int, int], target: int) -> None:
    """The log line of the official reference resize (once per resized or converted PIL image)."""
    if size != (image.height, image.width) or image.mode != "RGB":
        logger.info(
            "reference image %dx%d (%s) -> RGB %dx%d (long side <= %d, sides multiples of 32)",
            image.width, image.height, image.mode, size[1], size[0], target,
        )


def reference_pixels(
    references,
    image_size: int,
    *,
    array_type: type,
    from_array: Callable,
    from_pil: Callable = pil_to_array,
    kind: str = "array",
    path_hint: str = "",
    log: bool = False,
    name: str = "image",
) -> list[list] | None:
    """References, one entry per prompt (None, an image, or a list of images; :func:`references_per_prompt`) ->
    per prompt the list of (3, H, W) pixels in [-1, 1] by DeepGen's inference rule: the long side at most
    ``image_size`` (never enlarged), each side rounded up to a multiple of 32. None stays None.

    A PIL image (any mode) is converted and resized (bicubic) by ``from_pil(image, size)`` (:func:`pil_to_array`
    by default); ``log`` logs each resize or conversion. An array of ``array_type`` goes through
    ``from_array(array, where)``, which checks and sizes it (the PyTorch pipeline resizes tensors, the torch-free
    runtime takes only arrays of the right size). Anything else is a ValueError naming the ``kind`` of array
    accepted, with ``path_hint`` for a file path. ``name`` begins each error message (``where``); ``{i}`` /
    ``{j}`` in it are the prompt's and the reference's index (e.g. ``"images[{i}][{j}]"``)."""
    if references is None:
        return None
    out = []
    for i, entry in enumerate(references):
        items = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
        pixels = []
        for j, ref in enumerate(items):
            where = name.format(i=i, j=j)
            if isinstance(ref, array_type):
                pixels.append(from_array(ref, where))
                continue
            if not hasattr(ref, "convert"):
                hint = f" ({path_hint})" if path_hint and isinstance(ref, (str, os.PathLike)) else ""
                raise ValueError(f"{where}: expected PIL images or (3, H, W) {kind}s, got {type(ref).__name__}{hint}")
            if ref.width < 1 or ref.height < 1:
                raise ValueError(f"{where}: a reference is {ref.width}x{ref.height} px; give a non-empty image")
            size = limit_long_side_size(ref.height, ref.width, image_size)
            if log:
                log_reference_resize(ref, size, image_size)
            pixels.append(from_pil(ref, size))
        out.append(pixels)
    return out


def prompts_with_references(prompts: Sequence[str], references=None) -> list[tuple[str, list]]:
    """(prompt, its list of references) per prompt, checked: a list of str prompts and, when given, one references
    entry (a list, or None / empty for text-to-image) per prompt. The chat text of a pair is :func:`t2i_prompt`
    without references, else :func:`edit_prompt` with each reference's image-token count."""
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got a single str")
    references = list(references) if references is not None else [[] for _ in prompts]
    if len(references) != len(prompts):
        raise ValueError(f"references: got {len(references)} entries for {len(prompts)} prompts")
    pairs = []
    for prompt, refs in zip(prompts, references):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts: every prompt must be a str, got {type(prompt).__name__}")
        pairs.append((prompt, list(refs or [])))
    return pairs


def output_size(
    height: int | None, width: int | None, reference_sizes: Sequence[Sequence[tuple[int, int]]] | None, image_size: int
) -> tuple[int, int]:
    """The generated image's size: given, or — official edit behaviour — the processed reference's size when
    every prompt has exactly one reference of one common size, else ``image_size`` square. Checked: multiples
    of 32."""
    if height is None or width is None:
        default = (image_size, image_size)
        if reference_sizes and all(len(sizes) == 1 for sizes in reference_sizes):
            distinct = {tuple(sizes[0]) for sizes in reference_sizes}
            if len(distinct) == 1:
                default = distinct.pop()
        height = default[0] if height is None else height
        width = default[1] if width is None else width
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 32 or value % 32:
            raise ValueError(
                f"{name} must be a positive multiple of 32, got {value}; nearest valid: {nearest_multiples(int(value), 32)}"
            )
    return height, width


# -- vision patches ----------------------------------------------------------------------------------------------


def patch_layout(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    source: tuple[int, int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], tuple[int, int, int]]:
    """How a reference resized to ``height`` x ``width`` is cut into Qwen2.5-VL vision patches.

    Returns ``(blocks, order, patches, grid)``: reshape the (1, tp, 3, H, W) frames to ``blocks``, transpose them
    by ``order`` and reshape to ``patches`` = (N, 3*tp*p*p), i.e. patches ordered (t, row-block, col-block,
    row-in-merge, col-in-merge) with features ordered (channel, temporal, py, px); ``grid`` is (t, h, w) in
    patches. Sides must be multiples of patch * merge (``source``: the size before the resize, for the error).
    """
    unit = patch_size * merge_size
    if height % unit or width % unit:
        before = source if source is not None else (height, width)
        raise ValueError(
            f"pixels: a {before[0]}x{before[1]} reference resizes to {height}x{width}, which is not a multiple of "
            f"{unit}; reference sides must be multiples of 32"
        )
    gh, gw = height // unit, width // unit
    # dims: t tp c (h m p) (w n q) -> (t h w m n) (c tp p q)
    blocks = (1, temporal_patch_size, 3, gh, merge_size, patch_size, gw, merge_size, patch_size)
    order = (0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = (gh * gw * merge_size * merge_size, 3 * temporal_patch_size * patch_size * patch_size)
    return blocks, order, patches, (1, height // patch_size, width // patch_size)


# -- sampling ----------------------------------------------------------------------------------------------------

_UNSUPPORTED_SCHEDULER_OPTIONS = (
    "use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
    "shift_terminal", "stochastic_sampling",
)


def flow_match_grid(scheduler_config: dict, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (N,), sigmas (N + 1,)) float32 of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)``
    for a static shift (no dynamic shifting, no Karras/exponential/beta sigmas, no terminal stretch).

    Construction: sigma_max/min are the first/last entries of the training table (float32:
    s * x / (1 + (s - 1) x) with x = linspace(1, T, T)[::-1] / T); the grid is linspace(1000 sigma_max,
    1000 sigma_min, N) / T in float64, shifted again in float64, rounded to float32; timesteps = sigmas * T in
    float32; a terminal 0 is appended."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    cfg = scheduler_config
    unsupported = [key for key in _UNSUPPORTED_SCHEDULER_OPTIONS if cfg.get(key)]
    if unsupported:
        raise ValueError(f"scheduler: options {unsupported} are not supported by the exported runtimes")
    train_steps = int(cfg.get("num_train_timesteps", 1000))
    shift = float(cfg.get("shift", 1.0))
    table = np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1] / np.float32(train_steps)
    table = np.float32(shift) * table / (np.float32(1) + np.float32(shift - 1) * table)
    sigma_max, sigma_min = float(table[0]), float(table[-1])
    timesteps = np.linspace(sigma_max * train_steps, sigma_min * train_steps, num_inference_steps)
    sigmas = timesteps / train_steps
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    timesteps = (sigmas * np.float32(train_steps)).astype(np.float32)
    return timesteps, np.concatenate([sigmas, np.zeros(1, np.float32)])


def guidance(velocity_uncond, velocity_cond, scale: float):
    """Classifier-free guidance on velocities: v_u + s * (v_c - v_u) (numpy arrays or torch tensors)."""
    return velocity_uncond + scale * (velocity_cond - velocity_uncond)


def euler_update(x, velocity, dt):
    """One Euler step of the flow ODE, x + dt * v with dt = sigma_next - sigma (numpy arrays or torch tensors;
    the loops keep x and v in float32 whatever the model's dtype, so low-precision weights do not round the
    trajectory at every step)."""
    return x + dt * velocity


def cfg_order(batch: int) -> np.ndarray:
    """Under CFG the condition is encoded for ``[prompts; negatives]`` (2 * batch rows) and the DiT runs on
    ``[negatives; prompts]``, so that its velocity splits into (unconditional, conditional) halves: the rows
    ``[batch, ..., 2 batch - 1, 0, ..., batch - 1]``, int64."""
    return np.concatenate([np.arange(batch, 2 * batch), np.arange(batch)]).astype(np.int64)
