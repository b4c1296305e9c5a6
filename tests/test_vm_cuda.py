"""cuda_available: only "no driver / no device" means no GPU; a broken CUDA is reported."""

import pytest

from pipeline.core.errors import StageFailed
from pipeline.runtime import vm


class _FakeDriver:
    def __init__(self, init: int, count: int = 0):
        self.init, self.count = init, count

    def cuInit(self, flags):  # noqa: N802 (the driver API's name)
        return self.init

    def cuDeviceGetCount(self, ref):  # noqa: N802
        ref._obj.value = self.count
        return 0

    def cuGetErrorName(self, code, ref):  # noqa: N802
        return 1


def _loader(driver):
    def load(name):
        if driver is None:
            raise OSError(f"{name}: cannot open shared object file")
        return driver
    return load


def test_cuda_available_is_false_without_a_driver_or_a_device():
    assert vm._driver_device_count(_loader(None)) == 0
    assert vm._driver_device_count(_loader(_FakeDriver(100))) == 0  # CUDA_ERROR_NO_DEVICE
    assert vm._driver_device_count(_loader(_FakeDriver(0, count=0))) == 0
    assert vm._driver_device_count(_loader(_FakeDriver(0, count=2))) == 2
    assert vm.cuda_available(lambda: 0) is False


def test_a_broken_cuda_is_reported_not_taken_for_no_gpu(monkeypatch):
    with pytest.raises(StageFailed, match="CUresult 999"):
        vm._driver_device_count(_loader(_FakeDriver(999)))  # CUDA_ERROR_UNKNOWN
    with pytest.raises(StageFailed, match="CUresult 803"):
        vm._driver_device_count(_loader(_FakeDriver(803)))  # driver/module mismatch
    import tvm

    class NoDevice:
        exist = False

    monkeypatch.setattr(tvm, "cuda", lambda i=0: NoDevice())
    with pytest.raises(StageFailed, match="sees 1 GPU.*TVM's CUDA runtime does not"):
        vm.cuda_available(lambda: 1)

    def boom(i=0):
        raise RuntimeError("CUDA: initialization error")

    monkeypatch.setattr(tvm, "cuda", boom)
    with pytest.raises(StageFailed, match="initialization error"):
        vm.cuda_available(lambda: 1)


