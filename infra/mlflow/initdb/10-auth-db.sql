-- Runs once, when the PostgreSQL volume is first initialised: the database for MLflow's
-- basic-auth users and permissions, next to the tracking database "mlflow".
CREATE DATABASE mlflow_auth OWNER mlflow;
