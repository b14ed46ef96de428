"The distillation losses against direct computations of their papers' formulas."
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from fastkd.losses import DIST, DKD, BinarySoftTarget, LogitMSE, SoftTarget, standardize_logits


@pytest.fixture
def logits():
    "Student logits, teacher logits and targets for 6 items and 5 classes"
    return torch.randn(6, 5, dtype=torch.float64) * 3, torch.randn(6, 5, dtype=torch.float64) * 3, torch.tensor([0, 1, 2, 3, 4, 1])


def softmax(z, T=1.): return np.exp(z / T) / np.exp(z / T).sum(-1, keepdims=True)
def kl(p, q): return float((p * np.log(p / q)).sum(-1).mean())  # KL(p || q), summed over classes, batch mean


@pytest.mark.parametrize('T', [1., 4., 20.])
def test_soft_target_is_hintons_scaled_kl(logits, T):
    s, t, _ = (x.numpy() for x in logits)
    expected = T**2 * kl(softmax(t, T), softmax(s, T))
    assert SoftTarget(T)(*logits[:2]).item() == pytest.approx(expected, rel=1e-5)


def test_soft_target_is_zero_when_student_equals_teacher(logits):
    s = logits[0]
    assert SoftTarget(4)(s, s.clone()).item() == pytest.approx(0, abs=1e-6)


def test_standardize_logits_zscores_each_row(logits):
    z = logits[0].numpy()
    expected = (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)
    np.testing.assert_allclose(standardize_logits(logits[0]).numpy(), expected, rtol=1e-6)


def test_standardized_soft_target_ignores_logit_scale_and_shift(logits):
    s, t, _ = logits
    loss = SoftTarget(2, standardize=True)
    assert loss(s, t).item() == pytest.approx(loss(s * 5 + 3, t / 2 - 1).item(), rel=1e-4)
    assert loss(s, t).item() != pytest.approx(SoftTarget(2)(s, t).item(), rel=1e-2)


def dkd_direct(s, t, y, alpha, beta, T):
    "DKD item by item, from the paper's definitions"
    tckd, nckd = [], []
    for s_i, t_i, y_i in zip(s, t, y):
        p_s, p_t = softmax(s_i, T), softmax(t_i, T)
        b_s, b_t = np.array([p_s[y_i], 1 - p_s[y_i]]), np.array([p_t[y_i], 1 - p_t[y_i]])
        tckd.append((b_t * np.log(b_t / b_s)).sum())
        others = np.arange(len(s_i)) != y_i
        q_s, q_t = softmax(s_i[others], T), softmax(t_i[others], T)
        nckd.append((q_t * np.log(q_t / q_s)).sum())
    return T**2 * (alpha * np.mean(tckd) + beta * np.mean(nckd))


@pytest.mark.parametrize('alpha,beta,T', [(1., 8., 4.), (0.5, 2., 1.)])
def test_dkd_matches_the_papers_decomposition(logits, alpha, beta, T):
    s, t, y = (x.numpy() for x in logits)
    assert DKD(alpha, beta, T)(*logits).item() == pytest.approx(dkd_direct(s, t, y, alpha, beta, T), rel=1e-5)


def test_dkd_recombines_into_classical_kd(logits):
    "The paper's Eq. 5, item by item: KD = TCKD + (1 - p_t^target) * NCKD, i.e. DKD(alpha=1, beta=1 - p_t^target)"
    s, t, y = logits
    T = 3.
    for i in range(len(s)):
        teacher_target_prob = torch.softmax(t[i] / T, dim=-1)[y[i]].item()
        dkd = DKD(alpha=1., beta=1 - teacher_target_prob, T=T)(s[i:i+1], t[i:i+1], y[i:i+1])
        assert dkd.item() == pytest.approx(SoftTarget(T)(s[i:i+1], t[i:i+1]).item(), rel=1e-5)


def test_dkd_standardize_option_standardizes_first(logits):
    s, t, y = logits
    expected = DKD(1., 8., 2.)(standardize_logits(s), standardize_logits(t), y)
    assert DKD(1., 8., 2., standardize=True)(s, t, y).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize('beta,gamma,T', [(1., 1., 1.), (2., 0.5, 4.)])
def test_dist_is_inter_and_intra_class_pearson(logits, beta, gamma, T):
    s, t, _ = (x.numpy() for x in logits)
    p_s, p_t = softmax(s, T), softmax(t, T)
    inter = 1 - np.mean([pearsonr(a, b)[0] for a, b in zip(p_s, p_t)])
    intra = 1 - np.mean([pearsonr(a, b)[0] for a, b in zip(p_s.T, p_t.T)])
    expected = T**2 * (beta * inter + gamma * intra)
    assert DIST(beta, gamma, T)(*logits[:2]).item() == pytest.approx(expected, rel=1e-5)


def test_logit_mse(logits):
    s, t, _ = (x.numpy() for x in logits)
    assert LogitMSE()(*logits[:2]).item() == pytest.approx(((s - t)**2).mean(), rel=1e-6)


@pytest.mark.parametrize('loss', [SoftTarget(4), DKD(), DIST(), LogitMSE(), SoftTarget(4, standardize=True)])
def test_losses_compute_in_float32_from_half_inputs(logits, loss):
    s, t, y = logits
    half = loss(s.half(), t.half(), y)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss(s.half().float(), t.half().float(), y).item(), rel=1e-6)


@pytest.mark.parametrize('loss', [SoftTarget(4), DKD(), DIST(), LogitMSE()])
def test_losses_give_gradients_to_the_student(logits, loss):
    "That no gradient reaches the teacher is the callback's doing (its forward runs under no_grad): see test_callback"
    s, t, y = logits
    s = s.clone().requires_grad_()
    loss(s, t, y).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_defaults_are_the_papers():
    assert repr(SoftTarget()) == 'SoftTarget(T=4.0, standardize=False)'
    assert repr(DKD()) == 'DKD(alpha=1.0, beta=8.0, T=4.0, standardize=False)'
    assert repr(DIST()) == 'DIST(beta=1.0, gamma=1.0, T=1.0)'
    assert repr(BinarySoftTarget()) == 'BinarySoftTarget(T=1.0)'


def test_standardize_logits_keeps_nearly_constant_rows_finite_and_in_order():
    "eps is added to the spread: a row whose spread is below it is scaled down, not blown up or reversed"
    z = standardize_logits(torch.tensor([[0., 1e-8, 2e-8]]))
    assert torch.isfinite(z).all() and z[0, 0] < z[0, 1] < z[0, 2] and z.abs().max() < 0.2


def sigmoid(z): return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize('T', [1., 2.])
def test_binary_soft_target_is_the_scaled_bernoulli_kl_per_label(logits, T):
    s, t, _ = (x.numpy() for x in logits)
    p, q = sigmoid(t / T), sigmoid(s / T)
    expected = T**2 * (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).mean()
    assert BinarySoftTarget(T)(*logits[:2]).item() == pytest.approx(expected, rel=1e-5)


def test_binary_soft_target_sees_labels_as_independent():
    "All labels present for the teacher, none for the student: a large loss (a softmax across labels gives 0)"
    teacher, student = torch.full((1, 3), 5.), torch.full((1, 3), -5.)
    assert SoftTarget(1)(student, teacher).item() == pytest.approx(0, abs=1e-6)
    assert BinarySoftTarget(1)(student, teacher).item() > 4.5
    assert BinarySoftTarget(1)(teacher, teacher).item() == pytest.approx(0, abs=1e-6)


def test_dist_ranks_a_copy_of_the_teacher_above_its_opposite_even_for_nearly_uniform_outputs():
    "eps is added to the norms: for probabilities that hardly vary it shrinks the correlations, never flips them"
    t = torch.randn(6, 5) * 1e-4
    assert DIST()(t.clone(), t) < DIST()(-t, t)
