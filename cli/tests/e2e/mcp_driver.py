"""Drives `mesh mcp` with the Python MCP SDK (PyPI `mcp`), as an agent's MCP client would.

Usage: python3 mcp_driver.py PIDFILE -- COMMAND [ARGS...]

The server is started as `sh -c 'echo $$ > PIDFILE; exec COMMAND ARGS...'`, so a test can kill it by
pid. Requests come as JSON lines on stdin, answers go as JSON lines on stdout:

  {"op": "tools"}                               -> {"tools": [{"name", "inputSchema"}...]}
  {"op": "call", "tool": T, "args": {...}}      -> {"isError", "structured", "text"}
  {"op": "notes", "count": N, "timeout": S}     -> {"notes": [{"content", "meta"}...]} once N arrived
  {"op": "subscribe"}                           -> {"ok": true}
  {"op": "updates"}                             -> {"updates": N} resources/updated seen
  {"op": "restart"}                             -> {"ready": ...} the server started again
  {"op": "quit"}

A server that dies ends the driver with {"died": ...}.
"""

import json
import os
import sys
from typing import Any

import anyio
import mcp_types as types
from pydantic import BaseModel, ConfigDict

from mcp.client import ClientSession, NotificationBinding
from mcp.client.stdio import StdioServerParameters, stdio_client


class ChannelParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    content: str
    meta: dict[str, Any] = {}


notes: list[dict] = []
updates = 0


async def on_channel(params: ChannelParams) -> None:
    notes.append({"content": params.content, "meta": params.meta})


async def on_message(message: Any) -> None:
    global updates
    if isinstance(message, types.ResourceUpdatedNotification):
        updates += 1


def answer(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve_once(params: StdioServerParameters) -> bool:
    """Runs one server until `quit` (False) or `restart` (True)."""
    async with stdio_client(params) as (read, write):
        async with ClientSession(
            read,
            write,
            message_handler=on_message,
            notification_bindings=[
                NotificationBinding(method="notifications/claude/channel", params_type=ChannelParams, handler=on_channel)
            ],
        ) as session:
            init = await session.initialize()
            answer({
                "ready": True,
                "name": init.server_info.name,
                "instructions": init.instructions,
                "capabilities": init.capabilities.model_dump(by_alias=True, exclude_none=True),
            })
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    return False
                req = json.loads(line)
                op = req["op"]
                if op == "quit":
                    return False
                if op == "restart":
                    return True
                try:
                    if op == "tools":
                        listed = await session.list_tools()
                        answer({"tools": [{"name": t.name, "inputSchema": t.input_schema} for t in listed.tools]})
                    elif op == "call":
                        r = await session.call_tool(req["tool"], req.get("args", {}))
                        text = "".join(c.text for c in r.content if isinstance(c, types.TextContent))
                        answer({"isError": bool(r.is_error), "structured": r.structured_content, "text": text})
                    elif op == "notes":
                        with anyio.move_on_after(req.get("timeout", 10)):
                            while len(notes) < req["count"]:
                                await anyio.sleep(0.01)
                        answer({"notes": list(notes)})
                    elif op == "subscribe":
                        await session.subscribe_resource("mesh://inbox")
                        answer({"ok": True})
                    elif op == "updates":
                        answer({"updates": updates})
                    else:
                        answer({"error": f"unknown op {op}"})
                except Exception as e:  # the test reads the failure
                    answer({"error": repr(e)})


async def main() -> None:
    pidfile = sys.argv[1]
    command = sys.argv[sys.argv.index("--") + 1:]
    script = 'echo $$ > "$0"; exec "$@"'
    params = StdioServerParameters(command="sh", args=["-c", script, pidfile, *command], env=dict(os.environ))
    try:
        while await serve_once(params):
            pass
    except BaseException as e:  # the server died under us: say so, and end
        answer({"died": repr(e)})


if __name__ == "__main__":
    anyio.run(main)
