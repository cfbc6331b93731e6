"""Each loss alone: values, and W ranks x B equal to 1 rank x W*B (loss and every gradient)."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_on_ranks

from disco_dist.cluster.distributed import all_gather_no_grad, all_gather_with_grad
from disco_dist.train.losses import LogitScale, TeacherQueue, ckd_loss, mse_loss, sup_contrastive_loss

B, D_IN, D = 4, 6, 5


def problem():
    """A fixed little model and data: student = linear map, teacher embeddings and queue fixed."""
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, D)
    scale = LogitScale(math.e)
    data = {
        "x": torch.randn(2 * B, D_IN),
        "x_pos": torch.randn(2 * B, D_IN),
        "x_neg": torch.randn(2 * B, D_IN),
        "teacher": torch.randn(2 * B, D),
        "queue": F.normalize(torch.randn(7, D), dim=-1),
    }
    return model, scale, data


def compute(loss_name, model, scale, d, sl, gather=None):
    if loss_name == "mse":
        return mse_loss(model(d["x"][sl]), d["teacher"][sl])
    if loss_name == "ckd":
        # the caller gathers the frozen teacher's embeddings (no gradient needed): the global batch's keys
        return ckd_loss(model(d["x"][sl]), all_gather_no_grad(d["teacher"][sl]), scale(), d["queue"])
    return sup_contrastive_loss(
        model(d["x"][sl]),
        model(d["x_pos"][sl]),
        model(d["x_neg"][sl]),
        0.05 * scale() / math.e,
        **({"gather": gather} if gather else {}),
    )


def grads(model, scale):
    """Every parameter's gradient (zeros where a loss does not use the parameter)."""
    params = list(model.parameters()) + list(scale.parameters())
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def one_rank(loss_name):
    model, scale, data = problem()
    loss = compute(loss_name, model, scale, data, slice(None))
    loss.backward()
    return loss.item(), grads(model, scale)


def rank_fn(rank, world_size, loss_name, gather_name):
    model, scale, data = problem()
    gather = {"with_grad": all_gather_with_grad, "no_grad": all_gather_no_grad, None: None}[gather_name]
    loss = compute(loss_name, model, scale, data, slice(rank * B, (rank + 1) * B), gather)
    loss.backward()
    # what the engine does: average gradients (and, for the log, the loss) over the ranks
    averaged = grads(model, scale)
    for g in averaged:
        dist.all_reduce(g)
        g /= world_size
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return mean_loss.item() / world_size, averaged


@pytest.mark.parametrize("loss_name", ["mse", "ckd", "sup_contrastive"])
def test_two_ranks_equal_one_rank_of_twice_the_batch(loss_name, tmp_path):
    expected_loss, expected_grads = one_rank(loss_name)
    for rank_loss, rank_grads in run_on_ranks(rank_fn, 2, tmp_path, loss_name, None):
        assert rank_loss == pytest.approx(expected_loss, rel=1e-5)
        for got, want in zip(rank_grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_negative_control_gather_without_gradient_is_caught(tmp_path):
    _, expected_grads = one_rank("sup_contrastive")
    (_, rank_grads), _ = run_on_ranks(rank_fn, 2, tmp_path, "sup_contrastive", "no_grad")
    mismatches = [not torch.allclose(g, w, rtol=1e-4, atol=1e-7) for g, w in zip(rank_grads, expected_grads)]
    assert any(mismatches)


def test_ckd_values():
    torch.manual_seed(0)
    teacher = F.normalize(torch.randn(3, 4), dim=-1)
    perfect = ckd_loss(teacher * 5, teacher, torch.tensor(100.0), this_rank=0)
    assert perfect.item() < 1e-3  # the student that equals the teacher picks its own sentence
    uniform = ckd_loss(torch.randn(3, 4), teacher, torch.tensor(1e-6), torch.randn(5, 4), this_rank=0)
    assert uniform.item() == pytest.approx(math.log(8), rel=1e-3)  # 3 batch + 5 queue candidates, no preference


def test_ckd_equals_cross_entropy_over_batch_and_queue_candidates():
    """The block-wise log-sum-exp is the plain cross-entropy over [batch keys; queue] (values and gradients)."""
    torch.manual_seed(1)
    student = torch.randn(4, 6, requires_grad=True)
    keys, queue, scale = torch.randn(8, 6), F.normalize(torch.randn(50, 6), dim=-1), torch.tensor(7.0)
    loss = ckd_loss(student, keys, scale, queue, this_rank=1)
    (grad,) = torch.autograd.grad(loss, student)
    candidates = torch.cat([F.normalize(keys, dim=-1), queue])
    reference = F.cross_entropy(scale * F.normalize(student, dim=-1) @ candidates.T, torch.arange(4, 8))
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)


def test_sup_contrastive_temperature_and_hard_negatives():
    torch.manual_seed(0)
    a = torch.randn(4, 256)  # nearly orthogonal rows
    without = sup_contrastive_loss(a, a.clone(), None, 0.05, gather=lambda x: x, this_rank=0)
    with_neg = sup_contrastive_loss(a, a.clone(), a.clone(), 0.05, gather=lambda x: x, this_rank=0)
    assert without.item() < 1e-3
    assert with_neg.item() == pytest.approx(math.log(2), rel=1e-2)  # the hard negative ties the positive


def test_logit_scale_is_clamped_and_fixed_mode_has_no_parameter():
    assert LogitScale(1e6)().item() == pytest.approx(100.0)
    fixed = LogitScale(20.0, learnable=False)
    assert list(fixed.parameters()) == [] and fixed().item() == pytest.approx(20.0)


def test_queue_is_fifo_and_restorable():
    queue = TeacherQueue(5, 2)
    assert queue.negatives() == (None, None)
    queue.push(torch.arange(6.0).view(3, 2))
    queue.push(torch.arange(6.0, 12.0).view(3, 2))  # wraps: oldest row overwritten
    assert queue.filled == 5
    kept = torch.arange(2.0, 12.0).view(5, 2)  # the oldest row was overwritten; rows are stored unit length
    rows, valid = queue.negatives()
    order = rows[:, 1].argsort(descending=True)  # y/|row| falls as the rows grow: oldest first
    assert valid is None
    torch.testing.assert_close(rows[order], F.normalize(kept, dim=-1))
    restored = TeacherQueue(5, 2)
    restored.load_state_dict(queue.state_dict())
    torch.testing.assert_close(restored.negatives()[0], rows)
    assert restored.pointer == queue.pointer


def test_a_push_whose_step_was_skipped_on_the_device_leaves_the_queue_as_if_never_pushed():
    """The loop pushes a step's keys before it has read whether the step's update was skipped (a NaN loss):
    the device keeps the old rows where it was, the next loss masks them while the queue is filling, and once
    settled the queue equals one that was never pushed; a taken push counts as a plain one."""
    keys = [torch.randn(2, 3) for _ in range(4)]
    no, yes = torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)

    plain, queue = TeacherQueue(5, 3), TeacherQueue(5, 3)
    plain.push(keys[0])
    queue.push(keys[0], no)
    rows, valid = queue.negatives()  # unsettled: the pushed rows count only where the device says taken
    assert torch.equal(rows, plain.negatives()[0]) and valid.tolist() == [True, True]
    queue.settle(True)
    queue.push(keys[1], yes)  # skipped on the device
    rows, valid = queue.negatives()
    assert valid.tolist() == [True, True, False, False]
    student, scale = torch.randn(4, 3), torch.tensor(5.0)
    masked = ckd_loss(student, keys[2].repeat(2, 1), scale, rows, this_rank=0, queue_valid=valid)
    assert masked == ckd_loss(student, keys[2].repeat(2, 1), scale, plain.negatives()[0], this_rank=0)
    queue.settle(False)
    assert (queue.pointer, queue.filled) == (plain.pointer, plain.filled)
    assert torch.equal(queue.negatives()[0], plain.negatives()[0])

    for k in keys[2:]:  # fill and wrap, then a skipped push into a full queue: its old rows stay, unmasked
        plain.push(k)
        queue.push(k, no)
        queue.settle(True)
    before = queue.buffer.clone()
    queue.push(torch.randn(2, 3), yes)
    assert queue.negatives()[1] is None and torch.equal(queue.buffer, before)
    queue.settle(False)
    assert torch.equal(queue.buffer, plain.buffer) and queue.pointer == plain.pointer


def test_ridge_head_init_is_stable_on_rank_deficient_features():
    """Pooled features are nearly rank deficient; the head must still come out small and close to the
    least-squares fit, the same on every call."""
    from disco_dist.train.student import head_init_ridge

    torch.manual_seed(0)
    base = torch.randn(500, 6)
    features = torch.cat([base, base[:, :1] * 2.0], dim=1)  # a dependent column: rank 6 of 7
    true_map = torch.randn(7, 4) * 0.1
    targets = features @ true_map + 0.3
    head = torch.nn.Linear(7, 4)
    head_init_ridge(head, features, targets)
    assert head.weight.abs().max() < 1.0
    with torch.no_grad():
        torch.testing.assert_close(head(features), targets, rtol=1e-2, atol=1e-2)
    again = torch.nn.Linear(7, 4)
    head_init_ridge(again, features, targets)
    torch.testing.assert_close(again.weight, head.weight, rtol=0, atol=0)
