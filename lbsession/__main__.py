"""`python -m lbsession` is the same as the `lbsession` command."""

from lbsession.cli import main

raise SystemExit(main())
