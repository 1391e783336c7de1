"""DLPack bridge: zero-copy where promised, correct copies (announced) where not."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ERO_EGGROLL.core.bridge import (
    BridgeCopyWarning,
    inspect_conversion,
    jax_to_torch,
    shares_memory,
    torch_to_jax,
)

DTYPES = [
    (jnp.float32, torch.float32),
    (jnp.bfloat16, torch.bfloat16),
    (jnp.float16, torch.float16),
    (jnp.int32, torch.int32),
    (jnp.int8, torch.int8),
    (jnp.uint8, torch.uint8),
]


@pytest.mark.parametrize("jdtype,tdtype", DTYPES)
def test_jax_to_torch_is_zero_copy_for_each_dtype(jdtype, tdtype):
    x = (jnp.arange(96) % 7).astype(jdtype).reshape(8, 12)
    t = jax_to_torch(x)
    assert t.dtype == tdtype and tuple(t.shape) == (8, 12)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    assert shares_memory(x, t)
    np.testing.assert_array_equal(t.float().numpy(), np.asarray(x.astype(jnp.float32)))


@pytest.mark.parametrize("jdtype,tdtype", DTYPES)
def test_torch_to_jax_is_zero_copy_for_each_dtype(jdtype, tdtype):
    t = (torch.arange(96) % 7).to(tdtype).reshape(8, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BridgeCopyWarning)
        x = torch_to_jax(t)
    assert x.dtype == jdtype and x.shape == (8, 12)
    assert x.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), t.float().numpy())


def test_transposed_and_sliced_jax_arrays():
    x = jnp.arange(12.0).reshape(3, 4)
    for view in (x.T, x[:, 1:3], x[::2]):
        t = jax_to_torch(view)
        np.testing.assert_array_equal(t.numpy(), np.asarray(view))
        assert t.data_ptr() == view.unsafe_buffer_pointer()


def test_transposed_and_sliced_torch_tensors_keep_values():
    base = torch.arange(48.0).reshape(6, 8)
    for view in (base.T, base[1:4], base[:, 2:5]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BridgeCopyWarning)
            x = torch_to_jax(view)
        np.testing.assert_array_equal(np.asarray(x), view.numpy())


def test_unaligned_pointer_falls_back_to_a_correct_announced_copy():
    base = torch.arange(65, dtype=torch.float32)
    unaligned = base[1:]
    assert unaligned.data_ptr() % 64 != 0
    with pytest.warns(BridgeCopyWarning, match="not 64-byte aligned"):
        x = torch_to_jax(unaligned)
    np.testing.assert_array_equal(np.asarray(x), unaligned.numpy())
    assert not shares_memory(x, unaligned)
    report = inspect_conversion(unaligned)
    assert report.zero_copy is False
    with pytest.raises(ValueError, match="strict"):
        torch_to_jax(unaligned, strict=True)


def test_requires_grad_tensor_is_detached():
    t = torch.ones(16, requires_grad=True)
    x = torch_to_jax(t)
    assert x.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(x), np.ones(16, np.float32))


def test_prng_key_gives_a_clear_error():
    with pytest.raises(TypeError, match="PRNG key"):
        jax_to_torch(jax.random.key(0))


def test_int64_is_refused_rather_than_truncated():
    with pytest.raises(TypeError, match="int64"):
        torch_to_jax(torch.tensor([2**40]))


@pytest.mark.parametrize("bad", [np.ones(3), [1.0, 2.0], 3.0])
def test_wrong_input_types(bad):
    with pytest.raises(TypeError):
        jax_to_torch(bad)
    with pytest.raises(TypeError):
        torch_to_jax(bad)


def test_shares_memory_is_false_for_independent_buffers():
    assert not shares_memory(jnp.ones(8), torch.ones(8))


def test_inspect_conversion_reports_both_directions():
    report = inspect_conversion(jnp.ones((4, 4), jnp.bfloat16))
    assert report.zero_copy and report.direction == "jax->torch" and report.nbytes == 32
    assert report.dtype_in == "bfloat16" and report.dtype_out == "bfloat16"
    back = inspect_conversion(torch.zeros(128))
    assert back.zero_copy and back.direction == "torch->jax"
    assert "zero-copy" in str(back)


def test_a_strided_copy_names_its_layout_as_the_reason():
    columns = torch.arange(48.0).reshape(6, 8)[:, :5]  # starts where its (aligned) base starts; rows are 8 apart
    assert columns.data_ptr() % 64 == 0
    with pytest.raises(ValueError, match=r"strides \(8, 1\) are not a dense layout"):
        torch_to_jax(columns, strict=True)
