import pytest

from tests.team.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A new, empty database on the session's real PostgreSQL server."""
    return postgres_server.create_database()
