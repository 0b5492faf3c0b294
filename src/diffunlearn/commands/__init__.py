"""The command-line commands: each wires a library function to a config dataclass. The CLI (:mod:`diffunlearn.cli`)
is the top floor: it imports these, nothing imports it."""
