"""Where a training step's rollout comes from: sampled at the start of the step, or ahead of it.

``InStep`` (``trainer.max_staleness=null``, the default): step n samples its batch with the
weights of step n, then trains on it; the sampler then takes the new weights (version n + 1).

``Ahead`` (``trainer.max_staleness=k``): a thread samples the batch of step j with the weights of
step j - k (of step 0 for j < k) while the trainer works on the earlier steps, so the sampler
(a server: ``rollout=server``) and the learner overlap. The lag is exact, not "at most": the
trainer pushes the weights of step n + 1 only once the batch of step n + k is sampled, so every
batch's weight version, and with it the run, is a function of the seed alone. Each batch keeps the
log-probs of the weights that sampled it (``logp_sampling_B_T``) and their version
(``weight_version_B``); the learner recomputes the student's log-probs, and
``estimator.rollout_correction=per_decision`` weighs each token by the importance weight of the
current to the sampling policy over its prefix (docs/opd-math.md, "Samples from another policy").
k = 0 samples each batch after the previous push, as ``InStep`` does, with the same seeds.

The batches sampled ahead of a checkpoint go into it (``pending``), so a run killed at any moment
resumes with the same batches, none sampled twice or dropped.

Both sample step n's batch on the global generator seeded for (seed, "rollout", n[, rank]);
``Ahead`` does so in ``opdx.seeding.isolated``, whose blocks (evals' too) run one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from torch import nn

from opdx.backends import Sampler
from opdx.rollout import Rollout
from opdx.seeding import isolated, seed_global


class InStep:
    """Each step's batch sampled when the step asks for it (``take``), after the last push."""

    def __init__(self, sampler: Sampler, sample: Callable[[int], Rollout], seed: tuple[int, ...]) -> None:
        self.sampler, self.sample, self.seed = sampler, sample, seed

    def take(self, step: int) -> Rollout:
        """Step ``step``'s batch: ``sample(step)`` on the global generator seeded for it."""
        seed_global(self.seed[0], "rollout", step, *self.seed[1:])
        return self.sample(step)

    def push(self, policy: nn.Module, version: int) -> None:
        """The weights of ``policy`` (``version``: the steps they have taken) to the sampler."""
        self.sampler.update_weights(policy, version)

    def pending(self) -> dict[int, Rollout]:
        """The batches sampled for later steps: none."""
        return {}

    def close(self) -> None:
        """Nothing runs in the background."""


class Ahead(InStep):
    """A thread samples the batch of step j once the sampler holds the weights of step j - k
    (``max_staleness``); ``take`` waits for it. ``first``: the step the run (re)starts at, with
    the sampler holding its weights; ``restored``: batches sampled before a resume (``pending``).
    An error in the thread is raised again by the next ``take`` or ``push``."""

    def __init__(
        self,
        sampler: Sampler,
        sample: Callable[[int], Rollout],
        seed: tuple[int, ...],
        max_staleness: int,
        first: int,
        last: int,
        restored: dict[int, Rollout] | None = None,
    ) -> None:
        super().__init__(sampler, sample, seed)
        self.lag, self.last = max_staleness, last
        self.version = first  # the weights the sampler holds
        self.ready: dict[int, Rollout] = dict(restored or {})
        self.next = max([first - 1, *self.ready]) + 1  # the next step to sample
        self.error: BaseException | None = None
        self.stopping = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="opdx-rollouts", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self.changed:
                    step = self.next
                    if step >= self.last:
                        return
                    self.changed.wait_for(lambda step=step: self.stopping or self.version >= step - self.lag)
                    if self.stopping:
                        return
                with isolated(self.seed[0], "rollout", step, *self.seed[1:]):
                    rollout = self.sample(step)
                with self.changed:
                    self.ready[step] = rollout
                    self.next = step + 1
                    self.changed.notify_all()
        except BaseException as error:  # noqa: BLE001 (handed to the trainer's thread)
            with self.changed:
                self.error = error
                self.changed.notify_all()

    def _wait(self, done: Callable[[], bool]) -> None:
        """Block until ``done()`` (under the lock) or the thread failed (then its error)."""
        self.changed.wait_for(lambda: done() or self.error is not None)
        if self.error is not None:
            raise self.error

    def take(self, step: int) -> Rollout:
        with self.changed:
            self._wait(lambda: step in self.ready)
            return self.ready.pop(step)

    def push(self, policy: nn.Module, version: int) -> None:
        """After the batch of step ``version - 1 + k`` (the last one the old weights sample, within
        the run) is sampled: the new weights to the sampler, and the thread told."""
        with self.changed:
            self._wait(lambda: self.next > min(version - 1 + self.lag, self.last - 1))
        self.sampler.update_weights(policy, version)
        with self.changed:
            self.version = version
            self.changed.notify_all()

    def pending(self) -> dict[int, Rollout]:
        with self.changed:
            return dict(self.ready)

    def close(self) -> None:
        """Stop the thread after the batch it is sampling, if any."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.thread.join()
