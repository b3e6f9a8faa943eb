"""CoNAL on the known-answer problem (:class:`mtrl_arch.synthetic.ConflictProblem`).

The right answer, argued in the problem's docstring: A and B share (a task-specific first
stage cannot generalise off its half of the input space), C is task-specific from stage 0
(its features conflict with A's and B's in the first stage). Fixed seed, a 500-step search
(about 3-4 s on one CPU core), with and without the conflict-noticed operation.
"""
from __future__ import annotations

import pytest
import torch

from mtrl_arch.search import make_method
from mtrl_arch.synthetic import ConflictProblem, run_search
from mtrl_arch.tree import Tree
from mtrl_arch.trunk import Trunk
from mtrl_arch.update import GradientCombiner
from mtrl_arch.weighting import make_weighting

STEPS = 500
OPTIONS = {"lr": 1e-2}  # alpha moves within the short search (the paper's 5e-5 is for long runs)


def search(conflict_noticed: bool, seed: int = 0):
    problem = ConflictProblem(seed=0)
    method = make_method("conal", problem.spec(), OPTIONS, seed=seed)
    combiner = GradientCombiner(make_weighting("ew", n_tasks=3), conflict_noticed=conflict_noticed)
    net = run_search(method, problem, steps=STEPS, combiner=combiner, seed=seed)
    return problem, method, net


@pytest.fixture(scope="module")
def plain():
    return search(conflict_noticed=False)


@pytest.fixture(scope="module")
def noticed():
    return search(conflict_noticed=True)


@pytest.mark.parametrize("which", ["plain", "noticed"])
def test_conal_keeps_a_b_shared_and_branches_c_early(which: str, request) -> None:
    problem, method, _ = request.getfixturevalue(which)
    a, b, c = method.branch_points()
    assert c <= 1, f"C should leave the trunk before the conflicting stage, branch points {[a, b, c]}"
    assert min(a, b) > c and min(a, b) >= 1, f"A and B should stay shared longer than C, branch points {[a, b, c]}"
    tree = method.derive()
    assert tree.group_of(0, 0) == tree.group_of(0, 1), tree.render()  # A and B share stage 0
    assert 2 not in tree.group_of(0, 0), tree.render()                # without C
    assert set(tree.meta["branch_probs"]) == set(problem.tasks)


def test_conal_derive_is_deterministic(plain) -> None:
    _, method, net = plain
    _, method2, net2 = search(conflict_noticed=False)
    assert method2.derive() == method.derive()
    assert method2.derive().meta == method.derive().meta
    torch.testing.assert_close(net2.alpha, net.alpha, rtol=0, atol=0)


def test_derived_json_builds_identical_trunks(plain) -> None:
    problem, method, _ = plain
    spec = problem.spec()
    tree = method.derive()
    text = tree.to_json()
    first, second = Tree.from_json(text), Tree.from_json(text)
    assert first == tree and second == tree and first.meta == tree.meta
    net1 = Trunk(first, spec.stages, spec.heads)
    with torch.no_grad():  # distinct weights, so that loading the state_dict is what makes them equal
        g = torch.Generator().manual_seed(3)
        for p in net1.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    net2 = Trunk(second, spec.stages, spec.heads)
    net2.load_state_dict(net1.state_dict())
    x, _ = problem.full("val")
    torch.testing.assert_close(net2(x), net1(x), rtol=0, atol=0)
    assert net1.param_counts() == tree.param_counts(spec.stage_params(), spec.head_params())
