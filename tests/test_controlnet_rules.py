"""ControlNet's rules against their sources: diffusers' StableDiffusionControlNetPipeline and ControlNetModel,
and AUTOMATIC1111's ControlNet extension (sd-webui-controlnet, scripts/hook.py and its sampler callbacks,
transcribed below); and the stage's handling of rows, pooling and sums on numpy and torch arrays."""

import numpy as np
import pytest

from coreml_sd.conditioning import Conditioning
from coreml_sd.control import (ControlStage, ControlUnit, PreparedUnit, is_active, parse_control_mode,
                               residual_scales, soft_weights)
from coreml_sd.errors import InputError


# -- which steps ---------------------------------------------------------------------------------
def diffusers_keep(steps: int, start: float, end: float) -> list[bool]:
    """diffusers' pipeline_controlnet.py: controlnet_keep[i] = 1 - float(i/len < s or (i+1)/len > e)."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) == 1.0 for i in range(steps)]


def a1111_runs(steps: int, start: float, end: float) -> list[bool]:
    """A1111 running a k-diffusion sampler with the extension: launch_sampling sets state.sampling_step = 0;
    at each model call the cfg_denoiser callback hands state.sampling_step to the extension's
    guidance_schedule_handler (stopped = p < start or p > end, p = sampling_step / total steps); after the
    step's model call k-diffusion's callback sets state.sampling_step = i."""
    sampling_step, ran = 0, []
    for i in range(steps):
        p = sampling_step / steps
        ran.append(not (p < start or p > end))
        sampling_step = i  # callback_state({'i': i, ...}) after the model call
    return ran


@pytest.mark.parametrize("steps", [1, 4, 6, 20, 25])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.8), (0.0, 0.5), (0.5, 1.0), (0.3, 0.3), (1.0, 1.0)])
def test_active_steps_follow_diffusers_and_a1111(steps, start, end):
    assert [is_active(i, steps, start, end, "diffusers") for i in range(steps)] == diffusers_keep(steps, start, end)
    assert [is_active(i, steps, start, end, "a1111") for i in range(steps)] == a1111_runs(steps, start, end)


def test_the_two_rules_differ_where_a1111_lags_a_step():
    assert sum(is_active(i, 6, 0.0, 0.5, "diffusers") for i in range(6)) == 3
    assert sum(is_active(i, 6, 0.0, 0.5, "a1111") for i in range(6)) == 5


# -- weights ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [5, 10, 13])
def test_soft_weights_are_diffusers_logspace_and_a1111s_powers(count):
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(soft_weights(count), torch.logspace(-1, 0, count).numpy(), rtol=2e-7, atol=0)
    # hook.py: control_scales = [param.weight * (0.825 ** float(12 - i)) for i in range(13)]
    assert soft_weights(count, "a1111") == [0.825 ** float(12 - i) for i in range(13)][:count]


def test_residual_scales_per_mode():
    assert residual_scales(4, 0.7, "balanced") == [0.7] * 4
    assert residual_scales(4, 0.7, "prompt", pooled=True) == [0.7] * 4  # diffusers: no soft weights when pooled
    soft = residual_scales(13, 2.0, "controlnet", rule="a1111")
    assert soft[-1] == 2.0 and soft[0] == 2.0 * 0.825 ** 12
    assert residual_scales(13, 1.0, "prompt") == soft_weights(13)


@pytest.mark.parametrize("name,mode", [("balanced", "balanced"), ("Balanced", "balanced"),
                                       ("My prompt is more important", "prompt"), ("prompt", "prompt"),
                                       ("ControlNet is more important", "controlnet"), ("guess_mode", "controlnet"),
                                       (2, "controlnet"), ("1", "prompt")])
def test_control_mode_names(name, mode):
    assert parse_control_mode(name) == mode


def test_unknown_control_mode_lists_the_valid_ones():
    with pytest.raises(InputError, match="valid: balanced, prompt, controlnet"):
        parse_control_mode("strong")


# -- the stage -------------------------------------------------------------------------------------
class _Info:
    def __init__(self, pooled=False):
        self.pooled, self.a1111_model = pooled, "fake"


class FakeControlNet:
    """Residuals that tell the rows, timesteps and images apart: row r of residual k is
    (k + 1) * (sample[r].sum() + image[r].mean() + timestep[r]) everywhere."""

    def __init__(self, batch_size=None, count=3):
        self.batch_size, self.count, self.calls = batch_size, count, []

    def residuals(self, sample, timestep, cond, image):
        self.calls.append(int(sample.shape[0]))
        assert cond.rows == sample.shape[0] == image.shape[0]
        value = sample.sum(axis=(1, 2, 3)) + image.mean(axis=(1, 2, 3)) + timestep
        base = np.broadcast_to(value[:, None, None, None], (sample.shape[0], 2, 2, 2)).astype(np.float32)
        return tuple(base * (k + 1) for k in range(self.count))


def _unit(net, weight=1.0, mode="balanced", start=0.0, end=1.0, pooled=False, image_value=0.25):
    unit = ControlUnit("x", None, weight, start, end, mode=mode).checked(mode="balanced", resize_mode="crop")
    image = np.full((1, 3, 4, 4), image_value, np.float32)
    return PreparedUnit(unit, _Info(pooled), "controlnet:Fake", net, image)


def _inputs(rows=4):
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((rows, 4, 2, 2)).astype(np.float32)
    timestep = np.full(rows, 500.0, np.float32)
    return sample, timestep, Conditioning(np.zeros((rows, 3, 8), np.float32))


@pytest.mark.parametrize("batch_size", [None, 2])
def test_controlnet_mode_controls_only_the_conditional_half(batch_size):
    net = FakeControlNet(batch_size)
    stage = ControlStage([_unit(net, weight=0.5, mode="controlnet")], steps=10)
    sample, t, cond = _inputs(4)
    control = stage.apply(sample, t, cond, uncond_rows=2).control
    full = FakeControlNet().residuals(sample, t, cond, np.full((4, 3, 4, 4), 0.25, np.float32))
    scales = residual_scales(3, 0.5, "controlnet")
    for k in range(3):
        np.testing.assert_array_equal(control[k][:2], 0.0)
        np.testing.assert_allclose(control[k][2:], full[k][2:] * scales[k], rtol=1e-6)
    # Any batch: the conditional rows alone are run (diffusers); a fixed batch of 2: all four.
    assert net.calls == ([2] if batch_size is None else [4])


def test_units_sum_and_inactive_units_leave_the_conditioning_untouched():
    a, b = FakeControlNet(), FakeControlNet()
    stage = ControlStage([_unit(a, 1.0), _unit(b, 0.5, start=0.5, image_value=0.75)], steps=4)
    sample, t, cond = _inputs(2)
    early = stage.apply(sample, t, cond).control  # step 0: b not yet
    stage.at_step(2)
    late = stage.apply(sample, t, cond).control
    ra = a.residuals(sample, t, cond, np.full((2, 3, 4, 4), 0.25, np.float32))
    rb = b.residuals(sample, t, cond, np.full((2, 3, 4, 4), 0.75, np.float32))
    np.testing.assert_allclose(early[1], ra[1], rtol=1e-6)
    np.testing.assert_allclose(late[1], ra[1] + rb[1] * 0.5, rtol=1e-6)
    off = ControlStage([_unit(a, 0.0), _unit(b, 1.0, start=0.9)], steps=4)
    assert off.apply(sample, t, cond) is cond


def test_pooled_controlnet_averages_its_residuals_over_space():
    net = FakeControlNet()
    stage = ControlStage([_unit(net, pooled=True)], steps=1)
    sample, t, cond = _inputs(2)
    control = stage.apply(sample, t, cond).control
    assert control[0].shape == (2, 2, 1, 1)


def test_stage_on_torch_tensors_matches_numpy():
    torch = pytest.importorskip("torch")

    class TorchFake(FakeControlNet):
        def residuals(self, sample, timestep, cond, image):
            out = super().residuals(sample.numpy(), timestep.numpy(), cond.map(lambda a: a.numpy()), image.numpy())
            return tuple(torch.from_numpy(np.ascontiguousarray(r)) for r in out)

    sample, t, cond = _inputs(4)
    np_stage = ControlStage([_unit(FakeControlNet(), 0.8, mode="controlnet")], steps=2)
    t_unit = _unit(TorchFake(), 0.8, mode="controlnet")
    t_unit.image = torch.from_numpy(t_unit.image)
    t_stage = ControlStage([t_unit], steps=2)
    expected = np_stage.apply(sample, t, cond, 2).control
    got = t_stage.apply(torch.from_numpy(sample), torch.from_numpy(t), cond.map(torch.from_numpy), 2).control
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g.numpy(), e)
