import groovy.json.JsonSlurper

plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val executorchVersion: String = providers.gradleProperty("executorch.version").get()

android {
    namespace = "org.mlexport.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.mlexport.demo"
        minSdk = 28 // ExecuTorch's LLM demo floor (arm64-v8a devices, Android 9+)
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a") } // the AAR's XNNPACK kernels; x86_64 emulators run too slowly
        buildConfigField("String", "EXECUTORCH_VERSION", "\"$executorchVersion\"")
    }
    buildFeatures { buildConfig = true }
    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug") // a demo: installable without a release key
        }
    }
    // The model is tens of MB and memory-mapped after the first-launch copy: never compress it in the APK.
    androidResources { noCompress += listOf("pte", "ptd", "json") }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    implementation("org.pytorch:executorch-android:$executorchVersion")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("com.google.android.material:material:1.12.0")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
    implementation("androidx.lifecycle:lifecycle-runtime-ktx:2.8.7")
}

val assetsDir = layout.projectDirectory.dir("src/main/assets/mlexport")

// Runs `mlexport bundle android`: copies the artifact named by mlexport.artifact (an export dir, or a dist/ from
// `mlexport build`) into src/main/assets/mlexport with bundle.json. Run it once, or whenever the model changes.
tasks.register<Exec>("mlexportBundle") {
    group = "mlexport"
    description = "Copy the exported .pte, .ptd and tokenizer into the app (mlexport bundle android)"
    val root = rootProject.projectDir
    executable = root.resolve(providers.gradleProperty("mlexport.bin").get()).path
    args("bundle", "android", "--app", root.path, root.resolve(providers.gradleProperty("mlexport.artifact").get()).path)
}

// Checks bundle.json against the files and against this app's runtime before anything is packaged.
val verifyMlexportBundle by tasks.registering {
    group = "mlexport"
    description = "Fail the build if the bundled model is missing, altered, or made for another runtime"
    inputs.dir(assetsDir).optional()
    doLast {
        val dir = assetsDir.asFile
        val contractFile = dir.resolve("bundle.json")
        if (!contractFile.isFile) {
            throw GradleException("no model in the app: run ./gradlew mlexportBundle (or mlexport bundle android --app .)")
        }
        @Suppress("UNCHECKED_CAST")
        val contract = JsonSlurper().parse(contractFile) as Map<String, Any?>
        if (contract["contract_version"] != 1) throw GradleException("bundle.json contract ${contract["contract_version"]} is not 1: update the app or mlexport")
        if (contract["target"] != "executorch") throw GradleException("bundle.json is for ${contract["target"]}, not executorch")
        @Suppress("UNCHECKED_CAST")
        for (f in contract["files"] as List<Map<String, Any?>>) {
            val file = dir.resolve(f["path"] as String)
            if (!file.isFile || file.length() != (f["bytes"] as Number).toLong()) {
                throw GradleException("${file.name} is missing or altered since mlexport bundle: run ./gradlew mlexportBundle")
            }
        }
        @Suppress("UNCHECKED_CAST")
        val exported = (contract["runtime"] as Map<String, Any?>)["version"] as String? ?: ""
        val allow = providers.gradleProperty("mlexport.allowRuntimeMismatch").get() == "true"
        if (exported.split(".").take(2) != executorchVersion.split(".").take(2) && !allow) {
            throw GradleException(
                "the model was exported with executorch $exported but the app links executorch-android $executorchVersion: " +
                    "set executorch.version=$exported in gradle.properties if Maven Central has it, or " +
                    "mlexport.allowRuntimeMismatch=true to try anyway",
            )
        }
    }
}
tasks.named("preBuild") { dependsOn(verifyMlexportBundle) }
