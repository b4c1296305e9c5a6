"""PackFloat32NCHWc: fp32 conv regions in packed NCHW16c, exact against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import qdq_helpers as H

from pipeline.compiler import lowering
from pipeline.compiler.passes.pack_nchwc import PackFloat32NCHWc, pack_float_weight
from pipeline.core.targets import get_target, tvm_target


def test_weight_layout_is_oihw_ic_i_16o():
    w = np.random.default_rng(0).standard_normal((32, 8, 3, 3)).astype(np.float32)
    packed = pack_float_weight(w, ic_block=4)
    # [oc_chunk, ic_chunk, kh, kw, ic_block, oc_block]
    assert packed.shape == (2, 2, 3, 3, 4, 16)
    assert packed[1, 1, 2, 0, 3, 7] == w[16 + 7, 4 + 3, 2, 0]


# (model, convs packed, layout conversions: only where the region starts and ends)
CASES = {
    "residual": (H.residual_model, 3, 2),
    "maxpool": (H.maxpool_model, 2, 2),
    "classifier": (H.classifier_model, 1, 2),  # global average pooling stays packed
    "rgb_input": (lambda: H.conv_model(cin=3), 1, 2),  # input channels padded 3 -> 4
    "depthwise": (H.depthwise_model, 2, 4),  # the depthwise conv stays NCHW: two regions
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_fp32_matches_onnxruntime(case):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    make, convs, transforms = CASES[case]
    model = make()
    name, shape = model.graph.input[0].name, H.input_shape(model)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {name: x})[0]

    target = tvm_target(get_target("cpu"))
    mod = lowering.graph_cleanup()(from_onnx(model, keep_params_in_input=False))
    packer = PackFloat32NCHWc()
    with target:
        packer(mod)
    assert packer.last_stats == {"convs": convs, "layout_transforms": transforms}

    lowered = lowering.lower_for_target(mod, target, "float32", "NCHW16c")
    kernels = [gv.name_hint for gv, f in lowered.functions.items()
               if not isinstance(f, relax.Function)]
    assert sum("conv2d_NCHWc" in k for k in kernels) >= 1, kernels
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_int8_convs_are_left_to_the_vnni_rule(tmp_path):
    """The fp32 rule packs fp32 convs only: an integer module passes through unchanged."""
    import tvm

    from pipeline.compiler.passes.qdq_to_integer import quantize_to_integer

    mod, _ = quantize_to_integer(H.import_qdq(H.quantize_qdq(H.residual_model(), tmp_path)))
    packer = PackFloat32NCHWc()
    with tvm_target(get_target("cpu")):
        out = packer(mod)
    assert packer.last_stats == {"convs": 0, "layout_transforms": 0}
    tvm.ir.assert_structural_equal(out, mod)


def test_unknown_layout_is_refused():
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(H.residual_model(), keep_params_in_input=False)
    with pytest.raises(ValueError, match="use one of NHWC, NCHW16c, NHWC-winograd"):
        lowering.lower_for_target(mod, tvm_target(get_target("cpu")), "float32", "NCHW8c")


def test_requested_nchw16c_is_reported_without_fallback():
    """lower_for_target's report names the layout used; asked for NCHW16c, it is that one."""
    from tvm.relax.frontend.onnx import from_onnx

    mod = lowering.graph_cleanup()(from_onnx(H.residual_model(), keep_params_in_input=False))
    report: dict = {}
    lowering.lower_for_target(mod, tvm_target(get_target("cpu")), "float32", "NCHW16c", report)
    assert report == {"layout": "NCHW16c", "layout_requested": "NCHW16c",
                      "layout_fallback": None, "fast_math": {},  # a conv net: no exp/erf
                      "float32_fma": 0}  # float32: no quantized residual adds
