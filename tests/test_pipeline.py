"""opdx.pipeline: which weights sample each step's batch, in the step or ahead of it."""

import threading

import pytest
import torch

from opdx.pipeline import Ahead, InStep


class VersionedSampler:
    """Stands in for the sampler's weights: the version it was last given (``update_weights``)."""

    def __init__(self) -> None:
        self.version = 0
        self.pushed: list[int] = []

    def update_weights(self, model, version: int) -> None:
        self.version = version
        self.pushed.append(version)


def run_steps(pipeline, sampler, first: int, last: int) -> dict[int, tuple[int, int]]:
    """The loop of opdx.trainer: take step n's batch, then push the weights of step n + 1."""
    taken = {}
    for step in range(first, last):
        taken[step] = pipeline.take(step)
        pipeline.push(None, step + 1)
    pipeline.close()
    return taken


def sample_of(sampler: VersionedSampler):
    """A batch is (its step, the sampler's version when it was sampled, a draw of the seeded generator)."""
    return lambda step: (step, sampler.version, torch.randint(1000, ()).item())


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_ahead_samples_the_batch_of_step_j_with_the_weights_of_step_j_minus_k(lag):
    sampler = VersionedSampler()
    taken = run_steps(Ahead(sampler, sample_of(sampler), (0,), lag, first=0, last=9), sampler, 0, 9)
    assert {step: version for step, (_, version, _) in taken.items()} == {j: max(0, j - lag) for j in range(9)}
    assert sampler.pushed == list(range(1, 10))


def test_lag_0_samples_what_the_in_step_pipeline_samples():
    sampler, ahead_sampler = VersionedSampler(), VersionedSampler()
    in_step = run_steps(InStep(sampler, sample_of(sampler), (5,)), sampler, 0, 6)
    ahead = run_steps(Ahead(ahead_sampler, sample_of(ahead_sampler), (5,), 0, 0, 6), ahead_sampler, 0, 6)
    assert ahead == in_step  # same versions, and the same draws of the generator seeded per step


def test_the_batches_sampled_ahead_of_a_checkpoint_resume_the_run_unchanged():
    """Killed after step 4 (its checkpoint holds the batches of steps 4 and 5), resumed: every
    batch is the uninterrupted run's, none sampled twice."""
    sampler = VersionedSampler()
    whole = run_steps(Ahead(sampler, sample_of(sampler), (1,), 2, 0, 10), sampler, 0, 10)
    first = VersionedSampler()
    pipeline = Ahead(first, sample_of(first), (1,), 2, 0, 10)
    for step in range(4):
        pipeline.take(step)
        pipeline.push(None, step + 1)
    pending = pipeline.pending()
    assert sorted(pending) == [4, 5]
    pipeline.close()
    resumed = VersionedSampler()
    resumed.version = 4  # the checkpoint's weights, pushed at resume
    calls = []

    def sample(step):
        calls.append(step)
        return sample_of(resumed)(step)

    rest = run_steps(Ahead(resumed, sample, (1,), 2, 4, 10, restored=pending), resumed, 4, 10)
    assert rest == {step: whole[step] for step in range(4, 10)}
    assert calls == [6, 7, 8, 9]


def test_an_error_in_the_sampling_thread_is_raised_in_the_trainers():
    sampler = VersionedSampler()

    def sample(step):
        if step == 2:
            raise ConnectionError("the server went away")
        return step

    pipeline = Ahead(sampler, sample, (0,), 1, 0, 5)
    assert pipeline.take(0) == 0
    pipeline.push(None, 1)
    assert pipeline.take(1) == 1
    with pytest.raises(ConnectionError, match="went away"):
        pipeline.push(None, 2)  # waits for the batch of step 2, which failed
    pipeline.close()
    assert not any(thread.name == "opdx-rollouts" for thread in threading.enumerate())
