"""MLflow's basic-auth app for the deployments in cluster/ and docker/, with no credential in a file of
this repository or the image.

  python mlflow_auth.py server ARGS...   write the auth config from the environment, then `mlflow server ARGS`
  python mlflow_auth.py create-user      create the client user (REKD_MLFLOW_USERNAME / _PASSWORD) as the admin

MLflow's auth app reads its user database from `database_uri` in an INI file named by MLFLOW_AUTH_CONFIG_PATH
(no environment variable can set it, and it defaults to sqlite:///basic_auth.db in the working folder, which a
container loses on restart). `server` writes that file at start from MLFLOW_AUTH_DATABASE_URI, mode 600, into
a folder the deployment keeps in memory. The admin's name and password MLflow reads from the environment itself
(MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD).
"""
import configparser
import os
import sys

# Every account is made by the admin, and reading every search is what a shared results server is for, so
# signed-in users read everything; only an experiment's creator (the rekd client user) and the admin write.
DEFAULT_PERMISSION = "READ"


def write_auth_config(path: str, database_uri: str, default_permission: str) -> None:
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        "default_permission": default_permission,
        "database_uri": database_uri.replace("%", "%%"),  # MLflow reads the file with %-interpolation on
        "admin_username": os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        config.write(f)


def server(args: list) -> None:
    write_auth_config(os.environ["MLFLOW_AUTH_CONFIG_PATH"], os.environ["MLFLOW_AUTH_DATABASE_URI"],
                      os.environ.get("MLFLOW_AUTH_DEFAULT_PERMISSION", DEFAULT_PERMISSION))
    # exec: the server replaces this process, so the container's stop signal reaches it directly
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "server", *args])


def create_user() -> None:
    """Idempotent: a user that exists already is left as it is (its password is not changed)."""
    from mlflow.exceptions import RestException
    from mlflow.server.auth.client import AuthServiceClient

    username = os.environ["REKD_MLFLOW_USERNAME"]
    client = AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"])  # as MLFLOW_TRACKING_USERNAME/_PASSWORD: the admin
    try:
        client.create_user(username, os.environ["REKD_MLFLOW_PASSWORD"])
        print(f"created MLflow user {username}")
    except RestException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        print(f"MLflow user {username} exists already")


if __name__ == "__main__":
    if sys.argv[1:2] == ["server"]:
        server(sys.argv[2:])
    elif sys.argv[1:] == ["create-user"]:
        create_user()
    else:
        sys.exit(__doc__)
