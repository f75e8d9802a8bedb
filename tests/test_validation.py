import pytest
import torch

from dsinfra.validation import check_divisible, check_positive, check_range, check_tensor


def test_check_tensor_accepts_and_returns():
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert check_tensor("x", x, dtype=(torch.bfloat16, torch.float16), shape=("batch", 3)) is x


@pytest.mark.parametrize(
    "kwargs, value, error, message",
    [
        ({}, [1, 2], TypeError, "x must be a torch.Tensor; got list"),
        ({"dtype": torch.float16}, torch.zeros(2), TypeError, "x must have dtype float16; got float32"),
        ({"ndim": 3}, torch.zeros(2, 2), ValueError, "x must have 3 dimensions; got shape \\[2, 2\\]"),
        ({"shape": ("batch", 4)}, torch.zeros(2, 3), ValueError, "dimension 1 is 3, expected 4"),
        ({"device": "meta"}, torch.zeros(2), ValueError, "x must be on meta"),
        ({"contiguous": True}, torch.zeros(3, 2).t(), ValueError, "x must be contiguous"),
    ],
)
def test_check_tensor_names_the_argument(kwargs, value, error, message):
    with pytest.raises(error, match=message):
        check_tensor("x", value, **kwargs)


def test_check_range():
    check_range("idx", torch.tensor([-1, 0, 3]), 0, 4, ignore=-1)
    check_range("idx", torch.tensor([], dtype=torch.int64), 0, 4)
    with pytest.raises(ValueError, match=r"idx must hold values in \[0, 4\) or -1; found 4"):
        check_range("idx", torch.tensor([-1, 4]), 0, 4, ignore=-1)
    with pytest.raises(ValueError, match="found -2"):
        check_range("idx", torch.tensor([-2, 1]), 0, 4, ignore=-1)


def test_check_positive_and_divisible():
    assert check_positive("n", 3) == 3
    assert check_positive("n", 0, allow_zero=True) == 0
    with pytest.raises(ValueError, match="n must be > 0; got 0"):
        check_positive("n", 0)
    with pytest.raises(TypeError, match="n must be an int; got bool"):
        check_positive("n", True)
    with pytest.raises(ValueError, match=r"num_replicas \(10\) must be divisible by num_gpus \(4\)"):
        check_divisible("num_replicas", 10, 4, "num_gpus")
