"""Training of the bundled testbed models (:mod:`.train`). Left out of the installed wheel, which
ships the trained weights: the demo and the library never import it; train from a source checkout."""
