"""``python -m engine.serve ENGINE_DIR [options]``; see :mod:`engine.serve.cli`."""
from .cli import main

raise SystemExit(main())
