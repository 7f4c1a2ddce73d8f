"""A payload that Ray actors fetch by name, so no object reference travels in their creation arguments.

Ray keeps restartable actors' creation arguments for their restarts, and warns (an error line from its
core worker, ray-project/ray#53727) whenever those arguments hold an object in the object store: it cannot
promise that object outlives the actor. Here the payload is put in the object store once, the driver holds
its reference for the problem's life, and a small named holder actor, pinned to the driver's node and
never restarted, hands the reference to any actor that asks, including one Ray has just restarted. An
actor's creation arguments carry only the holder's name.
"""

from __future__ import annotations

import uuid
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0, max_restarts=0)
class _PayloadHolder:
    """Keeps the driver's reference to a payload and gives it out (wrapped, so Ray does not resolve it)."""

    def __init__(self) -> None:
        self._boxed: list = []

    def keep(self, boxed: list) -> None:
        self._boxed = boxed

    def get(self) -> list:
        return self._boxed


class SharedPayload:
    """Created on the driver with the payload; pickles to its holder's name; :meth:`get` anywhere in the
    Ray cluster returns the payload (fetched once per process)."""

    def __init__(self, payload: Any):
        self.name = f"evo-subens-payload-{uuid.uuid4().hex}"
        self._ref = ray.put(payload)
        node = ray.get_runtime_context().get_node_id()
        self._holder = _PayloadHolder.options(
            name=self.name, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        ray.get(self._holder.keep.remote([self._ref]))
        self._value: Any = payload

    def __getstate__(self) -> dict:
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.name = state["name"]
        self._ref = self._holder = self._value = None

    def get(self) -> Any:
        """The payload: on the driver the object itself, elsewhere fetched through the holder."""
        if self._value is None:
            [ref] = ray.get(ray.get_actor(self.name).get.remote())
            self._value = ray.get(ref)
        return self._value

    def release(self) -> None:
        """Stop the holder (on the driver; the payload leaves the object store with the last reference)."""
        if self._holder is not None:
            ray.kill(self._holder)
            self._holder = self._ref = None
