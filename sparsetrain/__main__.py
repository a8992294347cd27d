"""``python -m sparsetrain`` (what ``torchrun -m sparsetrain train ...`` runs)."""

from sparsetrain.cli import main

raise SystemExit(main())
