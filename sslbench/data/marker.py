"""The phantom marker: the file at the root of every phantom tree that makes its results phantom results.

:func:`sslbench.data.phantoms.synth` writes :data:`PARTIAL_MARKER` before the first file and replaces it by
:data:`MARKER` after the last, so a marker means "complete"; :mod:`sslbench.data.locate`,
:mod:`sslbench.data.check` and :mod:`sslbench.data.fingerprint` read it to label and key phantom data.
"""

#: Name of the marker file written at the root of every phantom tree (its presence means "complete").
MARKER = "sslbench_phantom.json"
#: Marker written while a synth is in progress; replaced by :data:`MARKER` when the tree is complete.
PARTIAL_MARKER = ".sslbench_phantom.partial.json"
#: The generator named inside the marker. Kept as the module path the generator had when markers were first
#: written (before sslbench.data.phantoms became a package): a phantom run's key hashes the marker, so a new
#: name would give every phantom run ever made a new key.
GENERATOR = "sslbench.data.phantom"
VERSION = 1
NOTE = "procedurally generated phantom, not real patient data"
