"""llama-cpp-python's OpenAI-compatible server on a listening socket the test already bound.

    python tests/integration/llama_server.py FD MODEL_PATH ALIAS

The parent binds 127.0.0.1:0 and passes the socket as FD (``pass_fds``): the port is known before this
process starts and no other process can take it in between (picking a free port and handing the number
over would race). The app is llama-cpp-python's own (``llama_cpp.server.app.create_app``, what
``python -m llama_cpp.server`` serves); uvicorn serves it on the inherited socket.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from services.forge.spare_cores import bound_openmp_spinning

bound_openmp_spinning()  # before llama_cpp loads (services/forge/spare_cores.py)


def main(fd: int, model: str, alias: str) -> None:
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    sock = socket.socket(fileno=fd)  # family and type come from the descriptor
    app = create_app(
        server_settings=ServerSettings(host="127.0.0.1", port=sock.getsockname()[1]),
        model_settings=[ModelSettings(model=model, model_alias=alias, n_ctx=4096, n_threads=1, n_threads_batch=1,
                                      verbose=False)],
    )  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
