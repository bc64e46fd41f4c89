"""Doctests see ``torch`` without importing it in every example."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace: dict[str, object]) -> None:
    doctest_namespace["torch"] = torch
    torch.manual_seed(0)
