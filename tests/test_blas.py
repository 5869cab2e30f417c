"""What results.json says about the BLAS kernels the heads computed with."""

import pytest

from featx._blas import AVX512_SUBSETS, blas_in_use, cpu_flags, unused_avx512_note

from .conftest import last_json, run_python

ZEN5 = AVX512_SUBSETS | {"avx2", "avx512_bf16"}


def test_a_pin_to_avx2_kernels_on_an_avx512_cpu_is_named_with_its_fix():
    note = unused_avx512_note(["Haswell"], ZEN5, "Haswell")
    assert "OPENBLAS_CORETYPE=Haswell pins them" in note and "set it to Cooperlake" in note
    unpinned = unused_avx512_note(["Haswell"], AVX512_SUBSETS | {"avx2"}, None)
    assert "OpenBLAS chose them" in unpinned and "OPENBLAS_CORETYPE=SkylakeX" in unpinned


@pytest.mark.parametrize("cores, flags", [
    (["SkylakeX"], ZEN5),  # AVX-512 kernels
    (["Cooperlake"], ZEN5),
    (["Haswell"], frozenset({"avx2", "fma"})),  # an AVX2 CPU: Haswell is right
    (["Haswell"], frozenset({"avx2", "avx512f"})),  # AVX-512F alone: SkylakeX kernels need more
    ([], ZEN5),  # no OpenBLAS (MKL, Accelerate)
])
def test_no_note_where_the_kernels_fit_the_cpu(cores, flags):
    assert unused_avx512_note(cores, flags, None) is None


def test_the_loaded_blas_is_recorded():
    blas = blas_in_use()
    assert blas["libraries"] and all(isinstance(name, str) and name for name in blas["libraries"])


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_process_pinned_to_haswell_gets_the_note_on_an_avx512_cpu():
    if not AVX512_SUBSETS <= cpu_flags():
        pytest.skip("the CPU has no AVX-512: Haswell kernels are the right ones")
    code = "import json; from featx._blas import blas_in_use; print(json.dumps(blas_in_use()))"
    pinned = last_json(run_python(code, env={"OPENBLAS_CORETYPE": "Haswell"}).stdout)
    assert pinned["openblas_coretype"] == "Haswell"
    if not any("openblas" in name for name in pinned["libraries"]):
        pytest.skip(f"numpy's BLAS is not OpenBLAS: {pinned['libraries']}")
    assert any(name.endswith("Haswell") for name in pinned["libraries"]) and "pins them" in pinned["note"]
