"""MLflow: where a store is and how it is opened (store), the runs rekd makes and their tags (runs), the one
ordered writer every command logs through (writer), the Tune callback that feeds it a search's trials
(tune_callback), links into the MLflow UI (links), how a trial ended, in one word (outcomes), and the names of
rekd's tags (tags). Only tune_callback imports Ray."""
