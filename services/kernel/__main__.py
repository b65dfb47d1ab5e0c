"""The kernel process: `python -m services.kernel` (supervisord's `kernel` program)."""

from batos.config import load
from batos.worker import run_service
from services.kernel.handlers import HANDLERS
from services.kernel.kernel import shutdown, startup, status_hook


def main() -> None:
    settings = load()
    # a `watch` holds its slot for as long as it watches: watchers get slots of their own beyond the work's
    run_service("kernel", HANDLERS, capacity=settings.worker_capacity + settings.watch_max_watchers,
                settings=settings, startup=startup, shutdown=shutdown, status=status_hook)


if __name__ == "__main__":
    main()
