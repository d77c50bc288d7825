"""The driver's mailbox for a parallel search: evaluations of running trials on their way to the
driver, and its answers back. Its own module, importing only asyncio, so the Ray actor that holds
it starts in a moment instead of importing the whole pipeline (torch, transformers, mlflow): the
events it carries are `pipeline.core.events.EvalEvent`s, whose module imports nothing heavy either."""

from __future__ import annotations

import asyncio
from typing import Any


class Reports:
    """Evaluations of running trials, on their way to the driver, and its answers back.

    An async actor: `ask` (a worker, blocking on the answer) and `take` (the driver, blocking
    until there is something to answer) wait without holding the actor."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.answers: dict[Any, asyncio.Future] = {}

    async def ask(self, key: Any, event: Any) -> bool:
        """A worker's evaluation (an `events.EvalEvent`); waits for the driver's answer: stop?"""
        answer = asyncio.get_running_loop().create_future()
        self.answers[key] = answer
        await self.queue.put((key, event))
        return await answer

    async def take(self) -> list[tuple[Any, Any]]:
        """(key, event) of every evaluation waiting; blocks until there is one."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    async def answer(self, key: Any, stop: bool) -> None:
        answer = self.answers.pop(key, None)
        if answer is not None and not answer.done():
            answer.set_result(stop)
