"""Strategies: where to evaluate next. The ask/tell contract shared by every search method.

- ``ask(n, pending)`` returns up to ``n`` valid configurations. ``pending`` holds the
  configurations being evaluated right now, so a strategy can avoid proposing them again.
- ``tell(trial)`` reports one finished trial (complete or failed). Tells arrive one at a time,
  in any order, possibly while other asks are outstanding: there is no batch barrier.
- ``restore(trials)`` rebuilds the state from a store's finished trials on resume; a strategy
  must also advance its random state there, so a resumed run does not repeat itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from qd.problem import Problem
from qd.space import Config
from qd.store import Store, Trial

if TYPE_CHECKING:
    import numpy as np

    from qd.columns import Columns


class Strategy(ABC):
    """Subclass and implement ``ask``; override the rest where the method has something better.

    Extension points (each with a working default):

    - ``ask`` (required), ``tell``, ``restore``: the per-configuration contract above;
    - ``batch_hint``, ``ask_raw``, ``tell_columns``, ``restore_columns``: the columnar path of
      array-native strategies (vectorised problems, resumes of 10^6 trials);
    - ``archive_spec`` (classmethod) and ``archive``: the archive the strategy keeps; the run
      records the spec and shares the archive (``qd.run.RunState``) instead of building its own;
    - ``sampler_class`` and ``option_defaults``: strategies that wrap an Optuna sampler take its
      options (``qd strategies`` lists them);
    - ``busy``, ``wait``, ``origin_of``, ``close``: asks computed beside the loop (``qd.background``);
    - ``state``: numbers for progress displays.

    ``qd.testing`` holds the contract test suite every strategy, built-in or plug-in, can run.
    """

    name: ClassVar[str] = ""
    #: The Optuna sampler whose keyword options this strategy accepts (None: its own ``__init__``'s).
    sampler_class: ClassVar[type | None] = None
    #: This strategy's defaults for its sampler's options, where they differ from the sampler's.
    option_defaults: ClassVar[dict[str, Any]] = {}
    #: The archive the strategy keeps (``qd.archive.RunArchive``), shared with the run; None: none.
    archive: Any = None

    @classmethod
    def archive_spec(cls, problem: Problem, seed: int, options: dict[str, Any]) -> Any:
        """The spec (``qd.archive.EliteSpec`` or ``ParetoSpec``) of the archive this strategy keeps
        for ``problem`` with these options, checked; None when it keeps none (the run then maps a
        problem with measures with ``qd.archive.spec_for_run``'s default).

        Raises:
            OptionError: a bad archive option (named, with what is allowed).
        """
        return None

    def __init__(self, problem: Problem, seed: int = 0):
        self.problem = problem
        self.space = problem.space
        self.seed = seed

    @abstractmethod
    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        """Propose configurations to evaluate next.

        Args:
            n: The most to propose (>= 1).
            pending: Configurations being evaluated now (asked, not yet told), to avoid repeating.

        Returns:
            Up to ``n`` configurations (dicts of parameter name to value); fewer, or none, when the
            strategy has nothing more to propose.
        """

    def tell(self, trial: Trial) -> None:
        """Learn from one finished trial. The default ignores it.

        Args:
            trial: A complete or failed trial (``trial.values`` in the problem's declared order).
        """

    #: How many configurations this strategy proposes at once when asked freely (the batch the
    #: in-process evaluator hands a vectorised problem).
    @property
    def batch_hint(self) -> int:
        """Configurations proposed at once when asked freely (1 by default)."""
        return 1

    def ask_raw(self, n: int) -> np.ndarray:
        """Propose configurations as a raw array, nothing pending.

        The default converts ``ask``; array-native strategies override it with ``tell_columns``.

        Args:
            n: The most to propose.

        Returns:
            Array of shape (n', d), n' <= n, in ``Space.to_raw``'s encoding.
        """
        return self.space.to_raw(self.ask(n, pending=()))

    def tell_columns(self, cols: Columns) -> None:
        """Learn from finished trials given as columns, in order. The default tells them one by one.

        Args:
            cols: ``Columns`` of n finished trials (raw (n, d), values (n, m), measures (n, k)).
        """
        from qd.store import trials_of

        for trial in trials_of(cols, self.space):
            self.tell(trial)

    def restore_columns(self, cols: Columns, store: Store | None = None) -> None:
        """Rebuild from a resumed run's trials as columns.

        The default builds ``Trial`` objects and calls ``restore``; archive strategies override it.

        Args:
            cols: ``Columns`` of the recorded trials, number order, stale ones included.
            store: The run's store, for strategies that read more of the record.
        """
        from qd.store import trials_of

        self.restore(trials_of(cols, self.space))

    def restore(self, trials: Sequence[Trial]) -> None:
        """Replay a resumed run's recorded trials; the default tells the finished ones.

        Args:
            trials: The trials in creation order; stale ones included, never told.
        """
        for t in trials:
            if t.finished:
                self.tell(t)

    # --- asks computed beside the loop (qd.background overrides these) -------------------------
    @property
    def busy(self) -> bool:
        """Whether a proposal is being computed beside the run loop now. Default: never."""
        return False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the proposal being computed is done (or ``timeout`` s); True when none runs."""
        return True

    def origin_of(self, config: Config) -> str:
        """Where a configuration this strategy handed out came from: "strategy" (default), or
        "fallback" for a quasi-random point handed out at an ask's time limit."""
        return "strategy"

    def close(self) -> None:
        """Release what the strategy holds (threads, worker processes). Default: nothing."""

    def state(self) -> dict[str, Any]:
        """Optional numbers for progress displays (e.g. archive coverage).

        Returns:
            Name -> number; {} by default.
        """
        return {}
