"""Published checkpoints and the network they fill: family specs, key layouts, weight files,
the ``VlmModel`` module (vision tower + projector + Phi decoder, and the vision stage that
selects a layer and projects it), tiny checkpoints in the published layouts, and the
library-version shims (``compat``). Imports nothing above it but the shared contracts."""
