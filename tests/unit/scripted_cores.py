"""A stand-in for services.forge.spare_cores.SpareCores in backend tests: the machine's decisions, scripted."""


class ScriptedCores:
    """The thread counts the machine "leaves", one per decision; the last one repeats."""

    def __init__(self, counts: list[int]):
        self.counts = list(counts)
        self.max_threads = max(counts)

    def threads(self) -> int:
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
