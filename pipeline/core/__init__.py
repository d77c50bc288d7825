"""The foundation: names, errors, events, console, timing, files, provenance, statistics. Imports no other layer."""
