"""Peak memory of a stage (pipeline.core.memory), as recorded in every manifest."""

import json
import mmap

from pipeline.core import memory
from pipeline.core.store import run_stage


def test_the_peak_is_the_stages_own_not_the_process_lifetime():
    with memory.measure() as big:
        # Fresh pages from the kernel: a numpy array may reuse heap pages that an earlier
        # test freed but the allocator kept resident, which raises no peak (seen in CI
        # after the full suite, at 980 MiB).
        block = mmap.mmap(-1, 64 * 2**20)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        block.close()
    with memory.measure() as small:
        pass
    assert big["peak_rss_mib"] >= small["peak_rss_mib"] + 50
    assert small["rss_at_start_mib"] <= small["peak_rss_mib"]
    assert "VmHWM" in small["method"] or "ru_maxrss" in small["method"]


def test_every_manifest_records_memory_time_and_output_bytes(tmp_path):
    def produce(out):
        (out / "a.bin").write_bytes(b"x" * 1000)

    result = run_stage(tmp_path, "demo", {"k": 1}, {}, tmp_path / "stable", produce)
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["output_bytes"] == 1000 and manifest["seconds"] >= 0
    assert manifest["memory"]["peak_rss_mib"] > 0
