"""Dense single-process references of the temperature tools (docs/tempnet_math.md 5.1), written
from the definitions with plain torch in float64: softmax, its entropy, a mixture of softmaxes.
tests/unit/test_temperature_tools.py and tests/unit/test_evaluate.py check the package's
vocab-parallel functions, evaluation and generation against them."""
import math

import torch


def softmax_entropy_confidence(z):
    """(H(p), max p) of p = softmax(z) over the last dim; entries of probability 0 add 0."""
    p = torch.softmax(z.double(), dim=-1)
    return -torch.where(p > 0, p * torch.log(p), 0.0).sum(-1), p.amax(-1)


def entropy_temperature(z, base, alpha):
    """T = base (1 + alpha H(softmax z) / log V), V = the last dim."""
    return base * (1 + alpha * softmax_entropy_confidence(z)[0] / math.log(z.shape[-1]))


def threshold_temperature(z, threshold, confident, uncertain):
    """confident where max softmax(z) >= threshold, else uncertain; and the confident mask."""
    conf = softmax_entropy_confidence(z)[1]
    return torch.where(conf >= threshold, confident, uncertain).double(), conf >= threshold


def ensemble_probs(z, temperatures):
    """p_ens = mean_k softmax(z / T_k) over the last dim."""
    return torch.stack([torch.softmax(z.double() / t, dim=-1) for t in temperatures]).mean(0)
