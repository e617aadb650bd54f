"""The answer to the server's roster query: this node's site id, read from its site YAML alone.

Nothing is prepared or read beyond the YAML (no manifest, no image): the reply carries the site id only.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from hccfed.client.site_yaml import site_config_path
from hccfed.common.run_config import RunConfig
from hccfed.common.site_config import load_site_config

IDENTIFY_RECORD = "identify"  # the same name as server/roster.py's (server and client share no module)


def is_identify_message(msg: Message) -> bool:
    return IDENTIFY_RECORD in msg.content


def identify_reply(msg: Message, context: Context) -> Message:
    config = load_site_config(site_config_path(RunConfig.from_mapping(context.run_config), context.node_config))
    return Message(content=RecordDict({IDENTIFY_RECORD: ConfigRecord({"site-id": config.site_id})}), reply_to=msg)
