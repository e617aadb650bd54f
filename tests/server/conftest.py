"""An in-process Flower Grid: the server's messages go straight to a ClientApp in this process.

It runs the real ClientApp and the real server code with one Context per node
(so mods such as SecAgg+ keep their state between stages), without a
SuperLink, Ray or subprocesses: fast enough for unit tests on 2 cores.
"""

from __future__ import annotations

import copy
import itertools
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    """A minimal Grid: node i gets node_configs[i]; replies are computed synchronously.

    ``tamper``: optional function (reply) -> reply applied to every reply (to fake a bad site).
    """

    def __init__(self, client_app: Callable[[Message, Context], Message], node_configs: list[dict[str, Any]],
                 run_config: dict[str, Any], run_id: int = 1, tamper: Callable[[Message], Message] | None = None):
        self.client_app = client_app
        self.node_ids = [101 + 7 * i for i in range(len(node_configs))]
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                                      run_config=dict(run_config))
                         for nid, cfg in zip(self.node_ids, node_configs)}
        self.run_id = run_id
        # Messages read their sender from the process' task identity (set by Flower's runtime).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.tamper = tamper
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    # --- the Grid interface used by strategies and workflows
    def set_run(self, run_id: int) -> None:
        self.run_id = run_id

    @property
    def run(self) -> Any:
        return SimpleNamespace(run_id=self.run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            message_id = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = message_id  # the SuperLink's job
            msg.metadata.__dict__["_created_at"] = time.time()
            self.sent.append(msg)
            # A real transport serialises: each node gets its own copy of the content.
            received = copy.deepcopy(msg)
            try:
                reply = copy.deepcopy(self.client_app(received, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:  # as Flower's runtime does: a ClientApp that raises sends an error reply
                reply = Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                            reason=f"{type(err).__name__}: {err}"), reply_to=received)
            if self.tamper is not None:
                reply = self.tamper(reply)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def in_process_grid():
    """The InProcessGrid class."""
    return InProcessGrid
