"""`python -m pipeline [options] [beam options]`."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
