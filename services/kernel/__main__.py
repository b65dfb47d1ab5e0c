"""The kernel process: `python -m services.kernel` (supervisord's `kernel` program)."""

from batos.worker import run_service
from services.kernel.handlers import HANDLERS
from services.kernel.kernel import shutdown, startup, status_hook


def main() -> None:
    run_service("kernel", HANDLERS, startup=startup, shutdown=shutdown, status=status_hook)


if __name__ == "__main__":
    main()
