"""`benchmarks/roofline.py`: the roofline arithmetic of benchmarks/speed.py, on hand numbers."""
import pytest

from benchmarks.roofline import bytes_per_image, rate, roofline, roofline_cells, triad_bytes


def test_triad_moves_three_arrays():
    assert triad_bytes(2 ** 26) == 3 * 256 * 2 ** 20  # float32: read b, read c, write a
    assert triad_bytes(10, element_size=2) == 60


def test_weights_are_shared_by_the_batch():
    assert bytes_per_image(100.0, 40.0, 1) == 140.0
    assert bytes_per_image(100.0, 40.0, 4) == 110.0


def test_the_slower_roof_binds():
    # 2 GFLOP at 100 GFLOP/s: 20 ms; 0.5 GB at 20 GB/s: 25 ms -> memory-bound
    assert roofline(2e9, 5e8, 100.0, 20.0) == (pytest.approx(0.025), "memory")
    # the same bytes at 50 GB/s: 10 ms -> compute-bound, 20 ms
    assert roofline(2e9, 5e8, 100.0, 50.0) == (pytest.approx(0.020), "compute")


def test_cells_give_the_share_of_the_measured_time():
    assert roofline_cells(2e9, 5e8, 100.0, 20.0, seconds_per_image=0.1) == ["25.00", "25.0 %", "memory"]
    assert roofline_cells(2e9, 5e8, 100.0, 50.0, seconds_per_image=0.04) == ["20.00", "50.0 %", "compute"]
    assert roofline_cells(2e9, 5e8, None, 50.0, seconds_per_image=0.04) == ["-", "-", "-"]


def test_rate_cell():
    assert rate(10.0, 2e9, 40.0) == "20.0 (50.0 %)"
    assert rate(10.0, 2e9, None) == "20.0"
