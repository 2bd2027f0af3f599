"""One thin module per command: parse options, call one ops function, render its result."""
