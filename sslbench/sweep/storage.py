"""Where a sweep's study lives: an Optuna journal file (the default, ``<out>/sweeps/<study>.journal``) or a
database URL (PostgreSQL for workers on several machines), and the grid sampler the worker loop drives."""
from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError


def _with_pg_driver(url: str) -> str:
    """``postgresql://`` names no driver: SQLAlchemy 2.1 then means psycopg (3), 2.0 psycopg2. Name the one that
    is installed (psycopg first, then psycopg2), so either package serves the documented URL; a URL that names
    its driver (``postgresql+psycopg2://``) is left as it is. Neither installed: one line saying what to install."""
    import importlib.util

    if not url.startswith(("postgresql://", "postgres://")):
        return url
    rest = url.split("://", 1)[1]
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise RecipeError(f"--storage {public_url(url)}: no PostgreSQL driver is installed; expected psycopg2 or "
                      f"psycopg (pip install 'sslbench[postgresql]', i.e. psycopg2-binary)")


def public_url(location: str) -> str:
    """A storage location as printed: a database URL without its password."""
    if "://" not in location:
        return location
    try:
        from sqlalchemy.engine import make_url

        return make_url(location).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: print it as given
        return location


def open_storage(location: str):
    """JournalStorage for a path (created), RDBStorage for a URL (postgresql://, mysql://, sqlite://)."""
    import optuna

    if "://" in location:
        location = _with_pg_driver(location)
        try:
            return optuna.storages.RDBStorage(location, engine_kwargs={"pool_pre_ping": True}
                                              if not location.startswith("sqlite") else None)
        except Exception as exc:  # noqa: BLE001 - driver missing, server down, bad URL: one line
            raise RecipeError(f"--storage {public_url(location)}: cannot open the database ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(location).expanduser()
    if path.is_dir():
        raise RecipeError(f"--storage {location}: is a folder; give a journal file path or a database URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def grid_sampler_class():
    import optuna

    class _Grid(optuna.samplers.GridSampler):
        """GridSampler whose after_trial never calls study.stop(): the worker loop decides when the grid is
        done (stop() only works inside optimize(), and this loop uses ask/tell)."""

        def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
            return None

    return _Grid
