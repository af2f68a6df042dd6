import os
import cifarjax as cj

cj.tune_process()  # the commands' CPU settings (XLA flags, huge pages): first, before anything starts JAX
config = cj.recipe_config("cnn", data_dir=os.environ.get("CIFARJAX_DATA", "data/cifar10-jpeg"),
                          subset=int(os.environ.get("CIFARJAX_SUBSET", "4000")),
                          n_epochs=int(os.environ.get("CIFARJAX_EPOCHS", "3")))  # kept in the run's config.json
data = cj.load_dataset(config.data_dir)  # decoded once, then cached
train, val = cj.train_val_split(data, config.val_fraction, config.seed, config.subset)  # as evaluate redraws it
config = config.replace(classes=data.classes)  # num_classes follows
result = cj.train_loop(config, train, val, run="runs/my-cnn")  # refuses a used folder; resume=True continues it
cj.plot_training_results(result.history.records, "runs/my-cnn/my_training.png")

run = cj.load_run("runs/my-cnn")  # a loop's run folder, experiments.cnn's or one fine-tune length's
print(cj.format_table(run.evaluate(val)))  # accuracy, per class, the most confused pairs
image = os.environ.get("CIFARJAX_IMAGE", "my_cat.jpg")
top3 = run.top(run.predict_files([image])[image])  # the 3 most probable (class, probability) pairs
print(image, [(c, round(p, 2)) for c, p in top3])  # e.g. my_cat.jpg [('cat', 0.61), ('dog', 0.22), ('bird', 0.07)]
