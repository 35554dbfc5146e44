"""``python -m ckptman``: the same CLI as the ``ckptman`` console script."""

from ckptman.cli import main

raise SystemExit(main())
